"""End-to-end scoring of a causal transformer on one device (made for the lent GPU), against naive
per-example gradients measured in the same run.

The pre-LN causal transformer of ``bench/peers/_models.py`` (``nn.Linear`` projections, a third of
the examples right-padded), every Linear tracked. Steps (each timed after a warm-up call on one
batch of each side, with ``torch.cuda.max_memory_allocated`` reset before it):

- ``plain``: one forward+backward pass over the train set (the unit of cost);
- ``tracin``: fastinf exact TracIn, ``pairwise_scores(query, train)`` (ghost / tiled kernels);
- ``naive_tracin``: the baseline: per-example gradients of the same parameters by one backward
  per example, flattened; query gradients kept, train gradients in chunks of ``batch``; one GEMM.
  Its scores are compared with fastinf's (``rel_err`` = max abs difference / max abs score);
- ``ekfac_fit``, ``ekfac_pairwise`` (exact), ``ekfac_rank32`` (``query_rank=32``), ``ekfac_self``.

Rows go to ``bench/results/e2e_gpu.csv`` (device, case, shapes, step, seconds, passes = seconds /
plain, peak MB, ratio = fastinf / naive for tracin).

    PYTHONPATH=. python bench/e2e/gpu_transformer.py [--device cuda] [--cases d256,d768] [--small]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch import nn

_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT / "bench"))
from _util import append_rows, device_name  # noqa: E402

# bench/peers is not put on sys.path: its kronfluence.py would shadow the kronfluence package
_spec = importlib.util.spec_from_file_location("_peer_models", _ROOT / "bench" / "peers" / "_models.py")
M = sys.modules["_peer_models"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(M)

CASES = {
    # the CPU peer benchmark's shape (README table), and a GPT-2-small-width one
    "d256": M.Shapes(n_train=256, n_query=256, T=48, d=256, layers=4, heads=4, vocab=384, mlp=1024,
                     batch_size=32),
    # 256 train x 32 queries: the naive baseline's one backward per example (576 of them at 512 x
    # 64) did not finish within 150 s on the H200 beside EK-FAC rank-32; this fits ~60 s
    "d768": M.Shapes(n_train=256, n_query=32, T=128, d=768, layers=4, heads=12, vocab=2048,
                     mlp=3072, batch_size=32),
}
SMALL = M.Shapes(n_train=24, n_query=8, T=12, d=32, layers=2, heads=2, vocab=48, mlp=64,
                 batch_size=8)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _measure(fn, dev, warm=None):
    """(result, seconds, peak MB) of ``fn()`` after one warm-up call of ``warm`` (default
    ``fn``; the steps warm up on a batch of each side, which compiles the same kernels)."""
    (warm or fn)()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
    return out, dt, peak


def _batches(data, bs):
    n = data[0].shape[0]
    return [tuple(t[i:i + bs] for t in data) for i in range(0, n, bs)]


def naive_tracin(model, params, query, train, bs):
    """Per-example gradients by one backward per example (what a library without factored kernels
    does), flattened; ``[Q, N]`` dot products, train gradients in chunks of ``bs``."""
    def grads(data):
        out = []
        for i in range(data[0].shape[0]):
            ex = tuple(t[i:i + 1] for t in data)
            g = torch.autograd.grad(M.loss_fn(model, ex).sum(), params)
            out.append(torch.cat([x.reshape(-1) for x in g]))
        return torch.stack(out)
    Gq = grads(query)
    return torch.cat([Gq @ grads(b).T for b in _batches(train, bs)], 1)


def run_case(name, s, dev, rows, dev_name):
    import fastinf
    torch.manual_seed(0)
    model = M.CausalLM(s)
    train, query = M.make_tokens(s.n_train, s, 1), M.make_tokens(s.n_query, s, 2)
    M.train_briefly(model, train, 10, s.batch_size)
    model = model.to(dev).eval()
    train = tuple(t.to(dev) for t in train)
    query = tuple(t.to(dev) for t in query)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    params = [p for n in names for p in model.get_submodule(n).parameters()]
    bs = s.batch_size
    kw = dict(modules=names, token_mask_fn=M.token_mask_fn, progress=False)
    shapes = s.describe()
    print(f"[{name}] {shapes}; {len(names)} Linear modules, "
          f"{sum(p.numel() for p in params) / 1e6:.1f} M tracked parameters", flush=True)

    def plain():
        for b in _batches(train, bs):
            model.zero_grad(set_to_none=True)
            M.loss_fn(model, b).sum().backward()
        model.zero_grad(set_to_none=True)

    _, t_plain, m_plain = _measure(plain, dev)
    res = {"plain": (t_plain, m_plain)}
    tr = fastinf.TracIn(model, M.loss_fn, **kw)
    q1, t1 = (tuple(t[:bs] for t in x) for x in (query, train))   # warm-up batches
    S_fast, res["tracin"] = (lambda r: (r[0], r[1:]))(
        _measure(lambda: tr.pairwise_scores(query, train, batch_size=bs), dev,
                 lambda: tr.pairwise_scores(q1, t1, batch_size=bs)))
    S_naive, res["naive_tracin"] = (lambda r: (r[0], r[1:]))(
        _measure(lambda: naive_tracin(model, params, query, train, bs), dev,
                 lambda: naive_tracin(model, params, tuple(t[:2] for t in q1), t1, bs)))
    S_fast, S_naive = S_fast.double().cpu(), S_naive.double().cpu()
    rel = float((S_fast - S_naive).abs().max() / S_naive.abs().max())
    ek = fastinf.EKFAC(model, M.loss_fn, **kw)
    _, *res["ekfac_fit"] = _measure(lambda: ek.fit(train, batch_size=bs), dev,
                                    lambda: ek.fit(t1, batch_size=bs))
    _, *res["ekfac_pairwise"] = _measure(lambda: ek.pairwise_scores(query, train, batch_size=bs),
                                         dev, lambda: ek.pairwise_scores(q1, t1, batch_size=bs))
    _, *res["ekfac_rank32"] = _measure(
        lambda: ek.pairwise_scores(query, train, batch_size=bs, query_rank=32), dev,
        lambda: ek.pairwise_scores(q1, t1, batch_size=bs, query_rank=32))
    _, *res["ekfac_self"] = _measure(lambda: ek.self_scores(train, batch_size=bs), dev,
                                     lambda: ek.self_scores(t1, batch_size=bs))
    for step, (t, m) in res.items():
        ratio = res["tracin"][0] / res["naive_tracin"][0] if step == "tracin" else ""
        row = dict(device=dev_name, case=name, step=step, seconds=f"{t:.4f}",
                   passes=f"{t / t_plain:.2f}", peak_mb=f"{m:.0f}",
                   ratio_vs_naive=f"{ratio:.3f}" if ratio != "" else "",
                   rel_err_vs_naive=f"{rel:.2e}" if step == "tracin" else "", shapes=shapes)
        rows.append(row)
        print(f"  {step:15s} {t:8.3f} s  {t / t_plain:7.2f} passes  peak {m:8.0f} MB"
              + (f"  fastinf/naive {ratio:.3f}  rel err {rel:.1e}" if step == "tracin" else ""),
              flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--small", action="store_true", help="one tiny case (smoke run)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dev_name = device_name(args.device)
    print(f"device: {dev_name}; torch {torch.__version__}", flush=True)
    cases = {"small": SMALL} if args.small else {c: CASES[c] for c in args.cases.split(",")}
    for name, s in cases.items():
        rows = []
        run_case(name, s, dev, rows, dev_name)
        if not args.no_save:   # each case saved as it ends (a time limit may stop the next)
            append_rows("e2e_gpu", rows)


if __name__ == "__main__":
    main()
