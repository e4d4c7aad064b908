#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (H100/H200; no network there): build fastinf
# with nvcc, run the gpu-marked tests, run the op benchmarks, write a report under $OUT.
# Budget: under 8 minutes. Build dependencies travel as wheels in .gpu-wheels/ (an ignored
# folder filled here by tools/fetch_gpu_wheels.sh, carried to the device machine).
#   run: bash bench/gpu_check.sh        (carry: [".gpu-wheels"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastinf_gpu_out}
PY=$(command -v python || command -v python3)
mkdir -p "$OUT"
REPORT="$OUT/report.md"
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)" | tee -a "$REPORT"; }

{
  echo "# fastinf GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
} >>"$REPORT"

step "build (nvcc, sm_90)"
if [ -d .gpu-wheels ]; then
  $PY -m pip install -q --no-index --find-links .gpu-wheels pybind11 scikit-build-core ninja cmake \
    tqdm safetensors >>"$OUT/build.log" 2>&1
fi
FASTINF_CUDA=on FASTINF_CUDA_ARCHS=90 $PY -m pip install -v --no-build-isolation --no-deps \
  --no-index . >>"$OUT/build.log" 2>&1
echo "build exit $?" | tee -a "$REPORT"
(cd /tmp && $PY -m fastinf info) >>"$REPORT" 2>&1

step "gpu tests"
# one Triton config per kernel in the tests (autotuning every test shape would eat the budget)
FASTINF_TRITON_AUTOTUNE=0 timeout 150 $PY -m pytest -q -m gpu tests -p no:cacheprovider \
  >"$OUT/gpu_tests.txt" 2>&1
echo "gpu tests exit $? : $(tail -1 "$OUT/gpu_tests.txt")" | tee -a "$REPORT"

step "op benchmarks"
for b in bench/ops/score_factored.py bench/ops/score_dense.py; do   # full GPU grids
  echo "--- $b" >>"$OUT/bench.txt"
  timeout 90 $PY "$b" --device cuda >>"$OUT/bench.txt" 2>&1
  echo "$b exit $?" | tee -a "$REPORT"
done
for b in bench/ops/ekfac_lambda.py bench/ops/kron_project.py bench/ops/jl_project.py; do
  echo "--- $b" >>"$OUT/bench.txt"
  timeout 60 $PY "$b" --device cuda --quick >>"$OUT/bench.txt" 2>&1
  echo "$b exit $?" | tee -a "$REPORT"
done
grep -E "^[0-9]+x|auto:" "$OUT/bench.txt" | head -40 >>"$REPORT"
cp bench/results/*.csv "$OUT"/ 2>/dev/null
step "done"
