#!/usr/bin/env bash
# Optional: the device image already has pybind11, scikit-build-core, ninja, cmake, tqdm and
# safetensors (see /work/.library/device/KINDS.md). Only if a build there reports one missing or
# too old: download it here into .gpu-wheels/ (ignored by git) and carry that folder; bench/gpu_check.sh
# then installs them into a private folder first (no network on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- pybind11 scikit-build-core pathspec packaging
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu-wheels \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "$@"
ls .gpu-wheels
