"""jl_project throughput (GB/s of gradient read) vs a dense torch projection in the same run.

Small CPU grid (~30 s) plus the bounded-memory case: a 10M-parameter gradient projected to
k=4096 (Φ would be 160 GB; the dense baseline is skipped there). Appends to bench/results/ops.csv.

    PYTHONPATH=. python bench/ops/jl_project.py [--device cpu|cuda] [--no-big]

GPU hook: with --device cuda, the TRAK fast_jl comparison runs when `fast_jl` is importable
(see `trak_fast_jl` below) -- it is GPU-only, so it is a hook for bench/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _util import append_rows, best_time as _time, device_name  # noqa: E402

from fastinf._native import available  # noqa: E402
from fastinf.ops import jl_project  # noqa: E402
from fastinf.ops.jl_project import phi_block, seed_key  # noqa: E402



def trak_fast_jl(X, k):  # GPU-only hook: TRAK's CUDA projector, when installed
    try:
        from trak.projectors import CudaProjector, ProjectionType
    except Exception:
        return None
    proj = CudaProjector(grad_dim=X.shape[1], proj_dim=k, seed=0,
                         proj_type=ProjectionType.rademacher, device=X.device,
                         max_batch_size=X.shape[0])
    return lambda: proj.project(X, model_id=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-big", action="store_true", help="skip the 10M -> 4096 bounded-memory case")
    ap.add_argument("--quick", action="store_true", help="first shape only, no big case")
    args = ap.parse_args()
    args.no_big = args.no_big or args.quick
    dev = torch.device(args.device)
    backends = ["torch"] + [b for b in (("cpu",) if dev.type == "cpu" else ("cuda", "triton"))
                            if available(b)]
    rows = []
    grid = [(64, 100_000, 512), (8, 1_000_000, 256), (256, 20_000, 1024)]
    for N, p, k in (grid[:1] if args.quick else grid):
        X = torch.randn(N, p, device=dev)
        Phi = phi_block(seed_key(0), 0, k, 0, p, "rademacher", device=dev) / k ** 0.5
        t_dense = _time(lambda: X @ Phi.T)
        del Phi
        for b in backends:
            if b == "torch" and dev.type == "cpu" and N * p > 2_000_000:
                continue  # the int64 torch hash is only a fallback on CPU: too slow to time here
            t = _time(lambda: jl_project(X, k, backend=b), reps=1 if b == "torch" else 3)
            gbps = N * p * 4 / t / 1e9
            rows.append(dict(device=device_name(args.device), op="jl_project",
                             case=f"N={N} p={p} k={k}", backend=b, seconds=f"{t:.4f}",
                             gbps=f"{gbps:.3f}", baseline="dense torch X@Phi.T (Phi stored)",
                             baseline_seconds=f"{t_dense:.4f}", ratio=f"{t / t_dense:.3f}"))
            print(f"N={N:4d} p={p:8d} k={k:5d} {b:6s} {t:8.4f}s {gbps:7.3f} GB/s   "
                  f"dense torch {t_dense:.4f}s  ratio {t / t_dense:.2f}x")
        if dev.type == "cuda":
            f = trak_fast_jl(X, k)
            if f is not None:
                t = _time(f)
                print(f"  TRAK fast_jl {t:.4f}s")
                rows.append(dict(device=device_name(args.device), op="jl_project",
                                 case=f"N={N} p={p} k={k}", backend="trak_fast_jl",
                                 seconds=f"{t:.4f}", gbps=f"{N * p * 4 / t / 1e9:.3f}"))
    if not args.no_big:
        N, p, k = 4, 10_000_000, 4096
        X = torch.randn(N, p, device=dev)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        b = "cpu" if dev.type == "cpu" and available("cpu") else backends[-1]
        t0 = time.perf_counter()
        jl_project(X, k, backend=b)
        t = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"bounded memory: N={N} p={p} k={k} {b}: {t:.2f}s, {N * p * 4 / t / 1e9:.3f} GB/s, "
              f"peak RSS {rss0:.2f} -> {rss1:.2f} GiB (Φ would be {k * p * 4 / 2**30:.0f} GiB)")
        rows.append(dict(device=device_name(args.device), op="jl_project",
                         case=f"N={N} p={p} k={k} bounded-memory", backend=b, seconds=f"{t:.3f}",
                         gbps=f"{N * p * 4 / t / 1e9:.3f}",
                         baseline=f"dense infeasible (Phi {k * p * 4 / 2**30:.0f} GiB); "
                                  f"peak RSS {rss1:.2f} GiB"))
    append_rows("ops", rows)


if __name__ == "__main__":
    main()
