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
from _util import append_rows, device_name, env_device, gemm_tflops, print_table, timeit  # noqa: E402


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


def run(op: str, shapes: Sequence, make: Callable, ours: Callable, baselines: Dict[str, tuple],
        dims: Sequence[str], contractions: Sequence[str], args) -> List[Dict]:
    """Times ``ours(inputs, backend, contraction)`` against ``baselines`` for every shape.

    ``baselines``: name -> (fn(inputs), intermediate_bytes(shape)); the best one that fits is
    the ratio reference ``best_torch``; ``materialize`` is the per-example-gradient baseline.
    ``dims`` names the entries of a shape for the dispatch table's cost model.
    """
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    dev_name = device_name(device)
    peak = gemm_tflops(device, dtype) if device.startswith("cuda") else None
    print(f"{op} on {dev_name}, {dtype}" + (f", GEMM {peak:.0f} TFLOP/s" if peak else ""))
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
                t = timeit(lambda: ours(inputs, backend, contraction), device)
                used = contraction or chosen
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
        del inputs
    print_table(rows, ["shape", "backend", "contraction", "ms", "best_torch", "ratio_vs_best_torch",
                       "speedup_vs_materialize", "flop_ratio_materialize_over_chosen", "tflops",
                       "pct_of_gemm"])
    if not args.no_save:
        append_rows("ops", rows)
    return rows
