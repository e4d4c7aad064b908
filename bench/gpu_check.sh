#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (H100/H200, no network): build fastinf with
# nvcc into a private site folder, run the gpu-marked tests AGAINST THAT INSTALLED PACKAGE (never
# the source tree, which has no compiled _C), run the op benchmarks, report under $OUT.
#
#   device tool: run(command="bash bench/gpu_check.sh", timeout_s=540)
#   (carry ".gpu-wheels" only if tools/fetch_gpu_wheels.sh was needed: the image has the build deps)
#
# Budget: everything ends within FASTINF_GPU_BUDGET_S (default 460 s; the build capped at 170 s):
# each step runs under `timeout` for min(its cap, what is left), so the caps can never add up past
# it. Steps: build 170 + preflight 30 + tests 130 + op benchmarks 130 + end-to-end 150 (cut to
# fit); on the H200 (2026-11-27) build, preflight and tests took 17 + 11 + 71 s, the op
# benchmarks print each row as measured (a cap keeps what was done).
# Returned files (the device returns at most 8): $OUT/report.md, $OUT/logs.txt (every step's log,
# appended as the step ends), $OUT/ops.csv (bench/results/ops.csv, copied after each benchmark).
# Exit status: 0 all passed, or no GPU visible (a dry run: build + CPU preflight, GPU steps
# skipped with a message); 1 a step failed; 2 a GPU is visible but fastinf's CUDA kernels or
# Triton are not usable (the tests would otherwise skip or fall back to torch silently).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/fastinf_gpu_out}
PY=python3
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SITE="$WORK/site"                       # the installed package lives here, outside the tree
REPORT="$OUT/report.md"
LOGS="$OUT/logs.txt"
: >"$LOGS"
t0=$(date +%s)
status=0
elapsed() { echo $(( $(date +%s) - t0 )); }
note() { echo "$*" | tee -a "$REPORT"; }
# run_step NAME CAP CMD...: runs CMD under timeout min(CAP, budget left), appends its log to
# logs.txt when it ends, notes the outcome in report.md; returns CMD's status (124 = timed out).
run_step() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - $(elapsed) - 5 ))
  local lim=$(( cap < left ? cap : left ))
  if [ "$lim" -lt 5 ]; then
    note "- **$name**: SKIPPED, budget spent ($(elapsed) s of $BUDGET)"; status=1; return 124
  fi
  local s0=$(date +%s) rc
  timeout --kill-after=5 "$lim" "$@" >"$WORK/step.log" 2>&1
  rc=$?
  { echo "===== $name (exit $rc, $(( $(date +%s) - s0 )) s, limit $lim s)"; cat "$WORK/step.log"; } >>"$LOGS"
  if [ $rc -eq 0 ]; then note "- **$name**: ok ($(( $(date +%s) - s0 )) s)"
  else note "- **$name**: FAILED exit $rc$([ $rc -eq 124 ] && echo ' (timed out)') ($(( $(date +%s) - s0 )) s); last lines:"
       tail -5 "$WORK/step.log" | sed 's/^/      /' | tee -a "$REPORT"; status=1; fi
  return $rc
}

GPU=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
{
  echo "# fastinf GPU check $(date -u +%FT%TZ)"
  echo
  echo '```'
  [ $GPU = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" 2>&1
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -1
  echo "git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
  echo '```'
  echo
} >"$REPORT"
# Without a GPU no device time is spent: a dry run on a small shared machine may build slowly.
if [ $GPU = 1 ]; then BUDGET=${FASTINF_GPU_BUDGET_S:-460}; BUILD_CAP=${FASTINF_GPU_BUILD_S:-170}
else BUDGET=${FASTINF_GPU_BUDGET_S:-1500}; BUILD_CAP=${FASTINF_GPU_BUILD_S:-1200}; fi
[ $GPU = 0 ] && note "**DRY RUN: no GPU visible (nvidia-smi finds none).** The build and the CPU preflight run; the GPU tests and benchmarks are skipped."

# ---- build: the package with its CUDA kernels (sm_90) into $SITE --------------------------
if [ -d "$ROOT/.gpu-wheels" ]; then
  run_step "build deps from .gpu-wheels" 30 $PY -m pip install -q --no-index --no-deps \
    --target "$WORK/deps" "$ROOT"/.gpu-wheels/*.whl && export PYTHONPATH="$WORK/deps"
fi
if command -v nvcc >/dev/null; then
  export CUDACXX=$(command -v nvcc) FASTINF_CUDA=on FASTINF_CUDA_ARCHS=${FASTINF_CUDA_ARCHS:-90}
else
  note "- nvcc not found: building without CUDA kernels"; export FASTINF_CUDA=off; status=1
fi
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
run_step "build (FASTINF_CUDA=$FASTINF_CUDA, archs ${FASTINF_CUDA_ARCHS:-})" "$BUILD_CAP" \
  $PY -m pip install --no-build-isolation --no-deps --no-index --target "$SITE" "$ROOT"
build_rc=$?
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
cd "$WORK"                              # nothing of the source tree on sys.path from here on

# ---- preflight: the INSTALLED package, with its CUDA kernels and Triton --------------------
cat >"$WORK/preflight.py" <<EOF
import sys, pytest, torch
# collect the tests as the test step will, then look at the fastinf that pytest imported
pytest.main(["--co", "-q", "-p", "no:cacheprovider", "--rootdir", "$ROOT",
             "$ROOT/tests/test_gpu_end_to_end.py"])
import fastinf
print("fastinf from", fastinf.__file__)
print(fastinf.backends())
if not fastinf.__file__.startswith("$SITE/"):
    sys.exit("FAIL: the tests would not use the installed package")
if torch.cuda.is_available():
    b = fastinf.backends()
    if not (b["cuda"].available and b["triton"].available):
        sys.exit(2)
else:
    print("no GPU visible: the cuda/triton backends cannot be checked (dry run)")
EOF
if [ $build_rc -eq 0 ]; then
  run_step "preflight (installed package, backends)" 30 $PY "$WORK/preflight.py"
  pre_rc=$?
  sed -n '/^fastinf from/,$p' "$WORK/step.log" | sed 's/^/    /' >>"$REPORT"
  if [ $GPU = 1 ] && [ $pre_rc -eq 2 ]; then
    note "**FAIL: a GPU is visible but fastinf.backends() lacks 'cuda' or 'triton'; stopping.**"
    exit 2
  fi
else
  note "**build failed: nothing to test**"; exit 1
fi

if [ $GPU = 0 ]; then
  note "Dry run done in $(elapsed) s (budget $BUDGET s). Files: $(ls "$OUT" | tr '\n' ' ')"
  exit $status
fi

# ---- gpu tests (one Triton config per kernel: autotuning every test shape would eat the budget)
# pytest-xdist (in the device image) spreads the Triton compiles over 4 processes, a file each
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 4 --dist loadfile")
run_step "gpu tests" 130 env FASTINF_TRITON_AUTOTUNE=0 \
  $PY -m pytest -q -m gpu -p no:cacheprovider -rfE $XDIST --rootdir "$ROOT" "$ROOT/tests"
grep -E "passed|failed|error" "$LOGS" | tail -1 | sed 's/^/    /' >>"$REPORT"

# ---- op benchmarks (autotuned; rows appended to bench/results/ops.csv, copied as each ends) --
for spec in score_factored:40 score_dense:30 ekfac_lambda:20 kron_project:20 jl_project:20; do
  b=${spec%%:*}
  run_step "bench $b" "${spec##*:}" $PY "$ROOT/bench/ops/$b.py" --device cuda --quick
  cp "$ROOT/bench/results/ops.csv" "$OUT/ops.csv" 2>/dev/null
  grep -E "^[0-9]+x|auto:|x$" "$WORK/step.log" | head -12 | sed 's/^/    /' >>"$REPORT"
done
# ---- the rank-r reduction: old batched SVD vs Gram + eigh (eigh on the CPU, the default on CUDA,
# and on the GPU) on the d=256 transformer's layer shapes; settles truncated_svd's CUDA default
run_step "bench truncated_svd" 45 env PYTHONUNBUFFERED=1 $PY "$ROOT/bench/e2e/truncated_svd.py" --device cuda --reps 1
cp "$ROOT/bench/results/truncated_svd.csv" "$OUT/truncated_svd.csv" 2>/dev/null
tail -6 "$WORK/step.log" | sed 's/^/    /' >>"$REPORT"
# ---- end to end: a d=256 then a d=768 causal transformer (~60 s on an H200 once EK-FAC rank-32
# is fixed), fastinf vs naive per-example gradients; each case's rows are saved as it ends
run_step "bench e2e gpu_transformer" 150 env PYTHONUNBUFFERED=1 $PY "$ROOT/bench/e2e/gpu_transformer.py" --device cuda
cp "$ROOT/bench/results/e2e_gpu.csv" "$OUT/e2e_gpu.csv" 2>/dev/null
grep -E "^\[|^  [a-z_]+ +[0-9]" "$WORK/step.log" | sed 's/^/    /' >>"$REPORT"
note "Done in $(elapsed) s (budget $BUDGET s), exit $status. Files: $(ls "$OUT" | tr '\n' ' ')"
exit $status
