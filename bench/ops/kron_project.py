"""kron_project throughput (GB/s of A and G read) vs a dense torch formulation in the same run.

Baseline: materialise ``D_n = G_nᵀ A_n`` and compute ``P_outᵀ D_n P_in`` with torch GEMMs (what a
LoGra-style implementation without the factored trick does). Appends to bench/results/ops.csv.

    PYTHONPATH=. python bench/ops/kron_project.py [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _util import append_rows, best_time as _time, device_name  # noqa: E402

from fastinf._native import available  # noqa: E402
from fastinf.ops import kron_project  # noqa: E402



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="first two shapes only (smoke run)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    extra = ("cpu", "cpp") if dev.type == "cpu" else ("cuda", "triton")
    backends = ["torch"] + [b for b in extra if available(b)]
    rows = []
    # N, T, din, dout, k_in, k_out
    grid = [(256, 1, 1025, 1024, 32, 32), (32, 64, 513, 512, 16, 16), (8, 512, 769, 768, 64, 64)]
    for N, T, din, dout, ki, ko in (grid[:2] if args.quick else grid):
        A = torch.randn(N, T, din, device=dev)
        G = torch.randn(N, T, dout, device=dev)
        Pi, Po = torch.randn(din, ki, device=dev), torch.randn(dout, ko, device=dev)

        def dense():
            D = torch.bmm(G.transpose(1, 2), A)
            return Po.T @ D @ Pi
        t_dense = _time(dense)
        gb = (A.numel() + G.numel()) * 4 / 1e9
        for b in backends:
            t = _time(lambda: kron_project(A, G, Pi, Po, backend=b))
            rows.append(dict(device=device_name(args.device), op="kron_project",
                             case=f"N={N} T={T} din={din} dout={dout} k={ki}x{ko}", backend=b,
                             seconds=f"{t:.5f}", gbps=f"{gb / t:.3f}",
                             baseline="torch materialised P_out^T (G^T A) P_in",
                             baseline_seconds=f"{t_dense:.5f}", ratio=f"{t / t_dense:.3f}"))
            print(f"N={N:4d} T={T:4d} din={din:5d} dout={dout:5d} k={ki}x{ko} {b:6s} {t:.5f}s "
                  f"{gb / t:7.3f} GB/s   dense {t_dense:.5f}s  ratio {t / t_dense:.2f}x")
    append_rows("ops", rows)


if __name__ == "__main__":
    main()
