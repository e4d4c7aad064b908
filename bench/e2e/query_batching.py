"""End-to-end: query memory bounded by the query batch, not the number of queries.

EK-FAC exact pairwise scores of 1,000 and 10,000 queries against ``--n-train`` training examples
on a small MLP (``--width``; one query's state ``Σ_layers dout·din`` floats, 134 KB at width 128),
each case in a fresh process, reporting time and the peak RSS above the process's state after the
fit (sampled, ``bench/_util.PeakMemory``). Cases: ``batched`` (default ``query_batch_size``
from ``FASTINF_QUERY_MEMORY_MB=--budget-mb``) and the baseline ``one batch``
(``query_batch_size = n_query``, every query state at once, as before query batching) for the
query counts in ``--one-batch`` (default 1,000 only: 10,000 would hold ~1.4 GB of query states).
Rows go to ``bench/results/e2e.csv``.

    python bench/e2e/query_batching.py [--width 128] [--n-train 256] [--budget-mb 64]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _util import append_rows, device_name, print_table, timed  # noqa: E402

import fastinf  # noqa: E402


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def one(args, n_query, qbs):
    torch.manual_seed(0)
    w = args.width
    model = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))
    X, y = torch.randn(args.n_train, w), torch.randint(0, 10, (args.n_train,))
    Xq, yq = torch.randn(n_query, w), torch.randint(0, 10, (n_query,))
    ek = fastinf.EKFAC(model, loss_fn, progress=False).fit((X, y), batch_size=args.batch_size)
    seen = []
    real = fastinf.scoring.query_batches

    def spy(*a, **k):
        for q0, st in real(*a, **k):
            seen.append(q0)
            yield q0, st
    fastinf.scoring.query_batches = spy
    S, dt, peak = timed(lambda: ek.pairwise_scores((Xq, yq), (X, y), batch_size=args.batch_size,
                                                   query_batch_size=qbs), "cpu")
    assert S.shape == (n_query, args.n_train) and torch.isfinite(S).all()
    per_query = sum(m.out_features * (m.in_features + 1) for m in ek.modules.values()) * 4
    return {"seconds": round(dt, 3), "peak_rss_mb": round(peak / 2**20, 1),
            "query_batches": len(seen), "query_state_mb_per_1k": round(per_query * 1000 / 2**20, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--budget-mb", type=float, default=64)
    ap.add_argument("--queries", default="1000,10000")
    ap.add_argument("--one-batch", default="1000", help="query counts also run as one batch")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        n_query, qbs = json.loads(args.case)
        print(json.dumps(one(args, n_query, qbs)))
        return
    cases = [(int(q), None) for q in args.queries.split(",")]
    cases += [(int(q), int(q)) for q in args.one_batch.split(",") if q]
    rows = []
    env = dict(os.environ, FASTINF_QUERY_MEMORY_MB=str(args.budget_mb))
    for n_query, qbs in cases:
        cmd = [sys.executable, __file__, "--case", json.dumps([n_query, qbs]),
               "--width", str(args.width), "--n-train", str(args.n_train),
               "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"bench": "query_batching", "method": "ekfac", "device": device_name("cpu"),
                     "model": f"mlp {args.width}x3", "n_train": args.n_train,
                     "n_query": n_query, "mode": "one batch" if qbs else "batched",
                     "query_budget_mb": args.budget_mb, **res})
        print_table(rows[-1:], list(rows[-1]))
    base = {r["n_query"]: r for r in rows if r["mode"] == "batched"}
    for r in rows:
        r["peak_over_batched_1k"] = round(r["peak_rss_mb"] / max(base[min(base)]["peak_rss_mb"],
                                                                 1e-9), 2)
    cols = ["n_query", "mode", "query_batches", "seconds", "peak_rss_mb", "peak_over_batched_1k",
            "query_state_mb_per_1k"]
    print_table(rows, cols)
    if not args.no_save:
        append_rows("e2e", rows)


if __name__ == "__main__":
    main()
