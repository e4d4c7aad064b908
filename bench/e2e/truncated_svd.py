"""EK-FAC ``query_rank=r``'s reduction of the preconditioned queries, on the d=256 transformer's
layer shapes: ``torch.linalg.svd`` (the former code) vs ``ops._common.truncated_svd`` (Gram on
the smaller side + float64 eigh, ``query_svd="exact"``) vs ``ops._common.randomized_svd`` (the
default: one power round since 2026-12-06; rows "randomized" before that date had two) and
``randomized_power2`` (two rounds), measured interleaved in the same process, fastest of ``--reps``.

``--real``: the matrices are the real preconditioned queries of bench/peers' transformer (EK-FAC
fitted on 64 examples after a few training steps, ``--queries`` queries), whose spectra decide
how close the randomized factors come; default: Gaussian matrices (a flat spectrum, the hard
case for the randomized one).

Shapes (dout, din with the bias column) of bench/e2e/ekfac_cost.py's model (4 blocks: q, k, v, o
257→256, fc1 257→1024, fc2 1025→256; lm_head 256→384): 25 layers, ``--queries`` float32
matrices each, rank ``--rank``. On CUDA a third variant keeps the eigh on the GPU
(``eigh_device="cuda"``; the default moves the Gram to the host, see truncated_svd's docstring).
``err`` is the largest difference of the rank-r reconstructions from the float64 SVD's,
relative to the largest entry; ``excess`` the largest ``‖X - L Rᵀ‖_F / ‖X - X_r‖_F - 1`` (0: as
good as the best rank-r approximation), both over the first 3 layers (``--real``: every 3rd).

    PYTHONPATH=. python bench/e2e/truncated_svd.py [--device cuda] [--queries 64] [--rank 32]
        [--reps 2] [--threads 2] [--real]

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

from fastinf.ops._common import randomized_svd, truncated_svd  # noqa: E402

LAYERS = 4 * [(256, 257)] * 4 + 4 * [(1024, 257), (256, 1025)] + [(384, 256)]


def by_svd(X, r):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :, :r] * S[:, None, :r], Vh[:, :r, :].mT


def real_queries(n_query: int, dev: str):
    """The matrices EK-FAC's query_layers reduces (one per layer, ``[n_query, dout, din]``) on
    bench/peers' transformer."""
    from peers import _models as M

    import fastinf
    import fastinf.ekfac as E
    s = M.Shapes(n_train=64, n_query=n_query)
    model = M.build_model("transformer", s)
    tr, q = M.make_tokens(64, s, 1), M.make_tokens(n_query, s, 2)
    M.train_briefly(model, tr, 20, 32)
    ek = fastinf.EKFAC(model.to(dev), M.loss_fn, token_mask_fn=M.token_mask_fn, progress=False)
    tr, q = (tuple(t.to(dev) for t in x) for x in (tr, q))
    ek.fit(tr, batch_size=32)
    saved = []
    real = E.c.randomized_svd

    def spy(X, r, **kw):
        saved.append(X.clone())
        return real(X, r, **kw)
    E.c.randomized_svd = spy
    try:
        ek.pairwise_scores(q, tuple(t[:8] for t in tr), batch_size=n_query, query_rank=32)
    finally:
        E.c.randomized_svd = real
    return saved


def excess(X, L, R, r):
    Xd = X.double()
    opt = (torch.linalg.svdvals(Xd)[:, r:] ** 2).sum(1).sqrt()
    return float((torch.linalg.matrix_norm(Xd - L.double() @ R.double().mT) / opt - 1).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--real", action="store_true", help="the transformer's real query matrices")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    torch.manual_seed(0)
    Xs = real_queries(a.queries, dev) if a.real else \
        [torch.randn(a.queries, m, n, device=dev) for m, n in LAYERS]
    check = list(range(0, len(Xs), 3)) if a.real else [0, 1, 2]
    variants = {"svd": by_svd, "gram_eigh": truncated_svd, "randomized": randomized_svd,
                "randomized_power2": lambda X, r: randomized_svd(X, r, power=2)}
    if dev.startswith("cuda"):
        variants["gram_eigh_on_gpu"] = lambda X, r: truncated_svd(X, r, eigh_device=dev)
    best = {k: float("inf") for k in variants}
    peak = {k: 0 for k in variants}
    err = {k: 0.0 for k in variants}
    exc = {k: 0.0 for k in variants}
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
                ref = [by_svd(Xs[i].double(), a.rank) for i in check]
                got = [out[i] for i in check]
                err[k] = max(float((L @ R.mT - Lr @ Rr.mT).abs().max() / (Lr @ Rr.mT).abs().max())
                             for (L, R), (Lr, Rr) in zip(got, ref))
                exc[k] = max(excess(Xs[i], *out[i], a.rank) for i in check)
            del out
    kind = "real transformer queries" if a.real else "Gaussian"
    shapes = (f"{len(Xs)} layers (dout,din) in {sorted(set(tuple(X.shape[1:]) for X in Xs))}, "
              f"Q={a.queries}, r={a.rank}, float32, {kind}")
    rows = [dict(device=device_name(dev), variant=k, shapes=shapes, seconds=f"{best[k]:.3f}",
                 ratio_svd=f"{best[k] / best['svd']:.3f}", peak_mib=f"{peak[k] / 2**20:.0f}",
                 err_vs_float64_svd=f"{err[k]:.1e}", frobenius_excess=f"{exc[k]:.1e}",
                 reps=a.reps) for k in variants]
    for r in rows:
        print(r)
    print("appended to", append_rows("truncated_svd", rows))


if __name__ == "__main__":
    main()
