#!/usr/bin/env bash
# Downloads the build dependencies for the offline GPU machine into .gpu-wheels/ (ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip download -q -d .gpu-wheels --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  pybind11 scikit-build-core ninja cmake pathspec packaging tqdm safetensors
ls .gpu-wheels
