"""Runner shared by the op benchmarks: each backend vs torch baselines, in the same run."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fastinf  # noqa: E402
from fastinf.ops import flops, plan  # noqa: E402
from _util import append_rows, device_name, env_device, gemm_tflops, timeit  # noqa: E402


def parse(description: str):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=env_device())
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: f32 on "
                   "CPU, bf16 on CUDA)")
    p.add_argument("--quick", action="store_true", help="a smaller grid (smoke run)")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results")
    return p.parse_args()


def usable_backends(device: str) -> List[str]:
    """Backends to time on ``device`` ("cpu" = the CPU rule, "cpp" = the C++ kernel forced);
    Triton only on a GPU: the interpreter is for tests, not timings."""
    dev = torch.device(device).type
    names = ("torch", "cpu", "cpp") if dev == "cpu" else ("torch", "triton", "cuda")
    return [b for b in names if fastinf.backends()[b].available]


def fits(nbytes: float, device: str) -> bool:
    """Whether a baseline's intermediate fits comfortably (it is skipped otherwise)."""
    limit = 0.5 * (torch.cuda.get_device_properties(device).total_memory
                   if device.startswith("cuda") else 8 * 2**30)
    return nbytes < limit


# A forced contraction (torch backend) is timed only when it needs at most this many times the
# FLOPs of the chosen one, or fewer than SKIP_FLOPS: the first run on an H200 spent minutes in
# score_factored's forced "materialize" at N=8192, Q=1024, 4096x4096 (2000x the FLOPs, 280 TFLOP
# per call) and never printed a row.
SKIP_RATIO, SKIP_FLOPS = 8.0, 5e11
COLS = [("shape", 24), ("backend", 7), ("contraction", 17), ("ms", 9), ("best_torch", 15),
        ("ratio_vs_best_torch", 8), ("speedup_vs_materialize", 8),
        ("flop_ratio_materialize_over_chosen", 8), ("tflops", 7), ("pct_of_gemm", 6)]


def _line(values) -> str:
    return "  ".join(v.ljust(w) for v, (_, w) in zip(values, COLS))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def run(op: str, shapes: Sequence, make: Callable, ours: Callable, baselines: Dict[str, tuple],
        dims: Sequence[str], contractions: Sequence[str], args) -> List[Dict]:
    """Times ``ours(inputs, backend, contraction)`` against ``baselines`` for every shape.

    ``baselines``: name -> (fn(inputs), intermediate_bytes(shape)); the best one that fits is
    the ratio reference ``best_torch``; ``materialize`` is the per-example-gradient baseline.
    ``dims`` names the entries of a shape for the dispatch table's cost model. Each row is
    printed (flushed) as it is measured, so a time limit keeps what was done; the rows are
    appended to bench/results/ops.csv at the end.
    """
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    dev_name = device_name(device)
    peak = gemm_tflops(device, dtype) if device.startswith("cuda") else None
    print(f"{op} on {dev_name}, {dtype}" + (f", GEMM {peak:.0f} TFLOP/s" if peak else ""),
          flush=True)
    print(_line([c[:w] for c, w in COLS]), flush=True)
    rows = []
    for shape in shapes:
        inputs = make(shape, dtype, device)
        kw = dict(zip(dims, shape))
        f = flops(op, **kw)
        chosen = plan(op, torch.device(device).type, **kw)
        base = {}
        for name, (fn, nbytes) in baselines.items():
            if fits(nbytes(shape), device):
                base[name] = timeit(lambda: fn(*inputs), device)
        best_name = min(base, key=base.get) if base else None
        for backend in usable_backends(device):
            for contraction in [None] + list(contractions):
                if contraction is not None and backend not in ("torch",) and contraction != chosen:
                    continue  # forced orders only on the torch backend, to show the trade-off
                used = contraction or chosen
                if f[used] > max(SKIP_RATIO * f[chosen], SKIP_FLOPS):
                    print(f"{'x'.join(map(str, shape))}: {backend}/{used} not timed, "
                          f"{f[used] / f[chosen]:.0f}x the FLOPs of {chosen}", flush=True)
                    continue
                t = timeit(lambda: ours(inputs, backend, contraction), device)
                row = {
                    "op": op, "device": dev_name, "dtype": str(dtype).replace("torch.", ""),
                    "shape": "x".join(map(str, shape)), "backend": backend,
                    "contraction": contraction or f"auto:{chosen}", "ms": t * 1e3,
                    "best_torch": best_name, "best_torch_ms": base[best_name] * 1e3 if best_name else None,
                    "ratio_vs_best_torch": t / base[best_name] if best_name else None,
                    "materialize_ms": base["materialize"] * 1e3 if "materialize" in base else None,
                    "speedup_vs_materialize": base["materialize"] / t if "materialize" in base else None,
                    "flop_ratio_materialize_over_chosen": f["materialize"] / f[chosen],
                    "tflops": f[used] / t / 1e12,
                    "pct_of_gemm": (100 * f[used] / t / 1e12 / peak) if peak else None,
                }
                rows.append(row)
                print(_line([_fmt(row[c]) for c, _ in COLS]), flush=True)
        del inputs
    if not args.no_save:
        append_rows("ops", rows)
    return rows
