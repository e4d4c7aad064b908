"""End-to-end: scoring from a GradientStore vs recomputing training gradients per query batch.

Recomputation (Kronfluence's approach) runs a training-gradient pass for every query batch of
``--query-batch`` queries: its time is measured on one query batch and multiplied by the number
of batches (``recompute_s``). The store path pays the pass once (the build) and then reads
shards. Also reported: fastinf's own direct path with all queries in one batch (``direct_s``,
one training pass). For 1, 16, 256, 1024 queries this prints the times, the ratios, the build
time and the bytes stored per example, and appends the rows to ``bench/results/e2e.csv``.

    python bench/e2e/store.py [--model cnn|mlp] [--n-train N] [--width 256] [--method ekfac|tracin]

``--model cnn`` (default): a small CNN on 3x32x32 inputs, where the training-gradient pass (the
convolutions) costs much more than scoring the stored gradients; ``--model mlp``: a 3-layer MLP
whose gradient pass is nearly free, so scoring dominates both paths.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _util import append_rows, device_name, print_table  # noqa: E402

import fastinf  # noqa: E402


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=2048)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    ap.add_argument("--no-save", action="store_true", help="do not append to bench/results")
    ap.add_argument("--method", default="ekfac", choices=["ekfac", "tracin"])
    ap.add_argument("--queries", default="1,16,256,1024")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--layout", default="auto", choices=["auto", "factors", "dense"])
    ap.add_argument("--query-batch", type=int, default=16,
                    help="queries per recomputation pass (Kronfluence's per-device query batch)")
    args = ap.parse_args()
    torch.manual_seed(0)
    w = args.width
    if args.model == "cnn":
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                              nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
        shape = (3, 32, 32)
    else:
        model = nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                              nn.Linear(w, 10))
        shape = (64,)
    n = args.n_train
    X, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
    train = (X, y)
    if args.method == "ekfac":
        method = fastinf.EKFAC(model, loss_fn, progress=False).fit(train, args.batch_size)
    else:
        method = fastinf.TracIn(model, loss_fn, progress=False)
    dev = device_name("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = fastinf.GradientStore.build(os.path.join(tmp, "s"), method, train,
                                            batch_size=args.batch_size, shard_size=4096,
                                            progress=False, layout=args.layout)
        build_s = time.perf_counter() - t0
        per_ex = store.nbytes / len(store)
        print(f"build {build_s:.2f} s, {per_ex:.0f} bytes/example, layouts {store.layouts}")
        for nq in [int(q) for q in args.queries.split(",")]:
            qx, qy = torch.randn(nq, *shape), torch.randint(0, 10, (nq,))
            t0 = time.perf_counter()
            S_store = method.pairwise_scores((qx, qy), store, batch_size=args.batch_size)
            t_store = time.perf_counter() - t0
            t0 = time.perf_counter()
            S_direct = method.pairwise_scores((qx, qy), train, batch_size=args.batch_size)
            t_direct = time.perf_counter() - t0
            err = float((S_store - S_direct).abs().max() / S_direct.abs().max())
            qb = min(nq, args.query_batch)
            t0 = time.perf_counter()
            method.pairwise_scores((qx[:qb], qy[:qb]), train, batch_size=args.batch_size)
            recompute_s = (time.perf_counter() - t0) * -(-nq // qb)
            rows.append(dict(bench="store", model=args.model, method=args.method, layout=args.layout,
                             device=dev, n_train=n,
                             width=w, n_query=nq, build_s=round(build_s, 4),
                             bytes_per_example=round(per_ex), store_s=round(t_store, 4),
                             direct_s=round(t_direct, 4), query_batch=qb,
                             recompute_s=round(recompute_s, 4),
                             recompute_over_store=round(recompute_s / t_store, 2),
                             direct_over_store=round(t_direct / t_store, 2),
                             store_per_query_ms=round(1e3 * t_store / nq, 4),
                             rel_err=f"{err:.1e}"))
    print_table(rows, ["method", "n_query", "store_s", "recompute_s", "recompute_over_store",
                       "direct_s", "direct_over_store",
                       "store_per_query_ms", "build_s", "bytes_per_example", "rel_err"])
    if not args.no_save:
        append_rows("e2e", rows)


if __name__ == "__main__":
    main()
