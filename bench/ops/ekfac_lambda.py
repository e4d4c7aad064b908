"""Benchmark of fastinf.ops.ekfac_lambda: every usable backend vs naive torch, same run.

Naive torch = per-example gradients of the whole batch materialised ([N, dout, din]) and rotated.
Prints ratios and appends to bench/results/ops.csv, with the peak extra memory of each call
(``peak_mib``: sampled RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). The CPU grid
holds small layers (call overhead) and the layers of the d = 256 transformer of
bench/peers/transformer.py (32 examples x 48 tokens, a third of them padded after 30 tokens,
din/dout with the bias column), ~1 min.
Usage: PYTHONPATH=. python bench/ops/ekfac_lambda.py [--device cuda]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import PeakMemory, append_rows, device_name  # noqa: E402

from fastinf import backends  # noqa: E402
from fastinf.ops import ekfac_lambda  # noqa: E402


def naive(A, G, QA, QS):
    D = torch.einsum("nto,nti->noi", G, A)
    return ((QS.T @ D @ QA) ** 2).sum(0)


def bench(fn, device, reps=3):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="first two shapes only (smoke run)")
    a = p.parse_args()
    dev = a.device
    grid = ([(64, 1, 257, 256), (32, 16, 129, 128), (16, 64, 289, 64), (8, 128, 256, 256),
             (32, 48, 257, 256), (32, 48, 257, 1024), (32, 48, 1025, 256), (32, 48, 257, 384)]
            if dev == "cpu" else
            [(256, 1, 1025, 1024), (64, 64, 513, 512), (32, 256, 1025, 1024), (64, 512, 289, 128)])
    grid = grid[:2] if a.quick else grid
    names = [b for b in ("torch", "cpu", "cpp", "triton", "cuda") if backends()[b].available]
    if dev == "cpu":
        names = [b for b in names if b in ("torch", "cpu", "cpp")]
    else:
        names = [b for b in names if b in ("torch", "triton", "cuda")]
    dname = device_name(dev)
    rows = []
    print(f"ekfac_lambda on {dname}")
    for N, T, din, dout in grid:
        A = torch.randn(N, T, din, device=dev)
        G = torch.randn(N, T, dout, device=dev)
        QA = torch.linalg.qr(torch.randn(din, din, device=dev))[0]
        QS = torch.linalg.qr(torch.randn(dout, dout, device=dev))[0]
        mask = None
        if T == 48:     # the transformer benchmark's padding: a third of the examples 30 long
            mask = torch.ones(N, T, dtype=torch.bool, device=dev)
            mask[::3, 30:] = False
        t0 = bench(lambda: naive(A * mask[..., None] if mask is not None else A, G, QA, QS), dev)
        for b in names:
            for c in ("rotate", "materialize"):
                if c == "materialize" and b != "torch":
                    continue
                def call():
                    return ekfac_lambda(A, G, QA, QS, a_mask=mask, backend=b, contraction=c)
                t = bench(call, dev)
                with PeakMemory(dev) as pm:
                    call()
                print(f"N={N:4d} T={T:4d} din={din:5d} dout={dout:5d} {b:>7}/{c:<11} "
                      f"{t * 1e3:9.2f} ms  naive {t0 * 1e3:9.2f} ms  speedup {t0 / t:6.2f}x  "
                      f"peak {pm.peak / 2**20:6.1f} MiB")
                shape = f"N={N} T={T} din={din} dout={dout}" + (" masked" if mask is not None else "")
                rows.append(dict(device=dname, op="ekfac_lambda", peak_mib=f"{pm.peak / 2**20:.1f}",
                                 shape=shape, backend=b,
                                 contraction=c, ms=f"{t * 1e3:.3f}", baseline="naive_torch",
                                 baseline_ms=f"{t0 * 1e3:.3f}", ratio=f"{t / t0:.4f}"))
    append_rows("ops", rows)


if __name__ == "__main__":
    main()
