"""EK-FAC ``query_rank=r``'s reduction of the preconditioned queries, on the d=256 transformer's
layer shapes: ``torch.linalg.svd`` (the former code) vs ``ops._common.truncated_svd`` (Gram on
the smaller side + float64 eigh), measured interleaved in the same process, fastest of ``--reps``.

Shapes (dout, din with the bias column) of bench/e2e/ekfac_cost.py's model (4 blocks: q, k, v, o
257→256, fc1 257→1024, fc2 1025→256; lm_head 256→384): 25 layers, ``--queries`` float32
matrices each, rank ``--rank``. On CUDA a third variant keeps the eigh on the GPU
(``eigh_device="cuda"``; the default moves the Gram to the host, see truncated_svd's docstring).
``err`` is the largest difference of the rank-r reconstructions from the SVD's, relative to the
largest entry.

    PYTHONPATH=. python bench/e2e/truncated_svd.py [--device cuda] [--queries 64] [--rank 32]
        [--reps 2] [--threads 2]

Rows are appended to ``bench/results/truncated_svd.csv``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT / "bench"))
from _util import PeakMemory, append_rows, device_name, sync  # noqa: E402

from fastinf.ops._common import truncated_svd  # noqa: E402

LAYERS = 4 * [(256, 257)] * 4 + 4 * [(1024, 257), (256, 1025)] + [(384, 256)]


def by_svd(X, r):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :, :r] * S[:, None, :r], Vh[:, :r, :].mT


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    torch.manual_seed(0)
    Xs = [torch.randn(a.queries, m, n, device=dev) for m, n in LAYERS]
    variants = {"svd": by_svd, "gram_eigh": truncated_svd}
    if dev.startswith("cuda"):
        variants["gram_eigh_on_gpu"] = lambda X, r: truncated_svd(X, r, eigh_device=dev)
    best = {k: float("inf") for k in variants}
    peak = {k: 0 for k in variants}
    err = {k: 0.0 for k in variants}
    for rep in range(a.reps):
        for k, fn in variants.items():          # interleaved: svd, gram, (gpu), svd, ...
            with PeakMemory(dev) as pm:
                sync(dev)
                t = time.perf_counter()
                out = [fn(X, a.rank) for X in Xs]
                sync(dev)
                dt = time.perf_counter() - t
            best[k], peak[k] = min(best[k], dt), max(peak[k], pm.peak)
            if rep == 0:
                ref = [by_svd(X.double(), a.rank) for X in Xs[:3]]
                err[k] = max(float((L @ R.mT - Lr @ Rr.mT).abs().max() / (Lr @ Rr.mT).abs().max())
                             for (L, R), (Lr, Rr) in zip(out, ref))
            del out
    shapes = f"{len(LAYERS)} layers (dout,din) in {sorted(set(LAYERS))}, Q={a.queries}, r={a.rank}, float32"
    rows = [dict(device=device_name(dev), variant=k, shapes=shapes, seconds=f"{best[k]:.3f}",
                 ratio_svd=f"{best[k] / best['svd']:.3f}", peak_mib=f"{peak[k] / 2**20:.0f}",
                 err_vs_float64_svd=f"{err[k]:.1e}", reps=a.reps) for k in variants]
    for r in rows:
        print(r)
    print("appended to", append_rows("truncated_svd", rows))


if __name__ == "__main__":
    main()
