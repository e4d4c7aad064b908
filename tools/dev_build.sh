#!/usr/bin/env bash
# Developer build: compiles fastinf._C into build/dev and copies it next to the sources, so
# that `PYTHONPATH=. pytest` tests the working tree without reinstalling.
# Usage: tools/dev_build.sh [cmake -D options...]   e.g. -DFASTINF_CUDA=off for a faster CPU-only build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v $PY)" "$@" >/dev/null
cmake --build build/dev -j "$(nproc)"
cp -f build/dev/_C*.so fastinf/
echo "built $(ls fastinf/_C*.so)"
