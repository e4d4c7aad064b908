"""fastinf EKFAC vs Kronfluence (EK-FAC, empirical Fisher, damping=None heuristic on both sides).

Same model, data and damping. Prints Spearman of the pairwise scores and time/memory ratios, and
appends rows to bench/results/peers.csv (device, case, metric, fastinf, peer, ratio).
Usage: PYTHONPATH=. python bench/peers/kronfluence.py [--small]
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(_HERE)]  # this file shadows the peer
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastinf  # noqa: E402
from _util import append_rows, device_name, timed  # noqa: E402

from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402


# ----------------------------------------------------------------------------- cases
class TinyLM(nn.Module):
    def __init__(self, V, d, h):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.head = nn.Linear(d, V)

    def forward(self, x):
        e = self.emb(x)
        ctx = e.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device)[:, None]
        z = e + self.fc2(F.gelu(self.fc1(ctx)))
        return self.head(z)


def mlp_case(small):
    try:
        from sklearn.datasets import load_digits
        d = load_digits()
        X = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target)
    except Exception:  # pragma: no cover
        X, y = torch.randn(1797, 64), torch.randint(0, 10, (1797,))
    n = 512 if small else 1024
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(X[:n]), y[:n]).backward()
        opt.step()

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")
    return "mlp_digits", model.eval(), loss_fn, (X[:n], y[:n])


def lm_case(small):
    torch.manual_seed(0)
    V, T = 64, 32
    n = 128 if small else 256
    x = torch.randint(0, V, (n, T))
    x[:, 1::2] = (x[:, 0::2] * 7 + 3) % V  # learnable structure
    model = TinyLM(V, 64, 128)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()

    def loss_fn(m, b):
        toks = b[0]
        logits = m(toks[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), toks[:, 1:], reduction="none").sum(1)
    return "tiny_lm", model.eval(), loss_fn, (x,)


class _Task(Task):
    def __init__(self, loss_fn):
        super().__init__()
        self.loss_fn = loss_fn

    def compute_train_loss(self, batch, model, sample=False):
        assert not sample
        return self.loss_fn(model, batch).sum()

    def compute_measurement(self, batch, model):
        return self.loss_fn(model, batch).sum()


# ----------------------------------------------------------------------------- runs
def run_case(case, device, n_queries, bs, rows, dev_name):
    name, model, loss_fn, data = case
    model = model.to(device)
    data = tuple(t.to(device) for t in data)
    n = data[0].shape[0]

    # fastinf
    ek = fastinf.EKFAC(model, loss_fn, progress=False)
    _, t_fit, m_fit = timed(lambda: ek.fit(data, batch_size=bs), device)
    fi = {"fit": (t_fit, m_fit)}
    fi_scores = {}
    for Q in n_queries:
        q = tuple(t[:Q] if Q <= n else t.repeat(-(-Q // n), *([1] * (t.dim() - 1)))[:Q] for t in data)
        S, t, m = timed(lambda: ek.pairwise_scores(q, data, batch_size=bs), device)
        fi[f"pairwise_{Q}q"] = (t, m)
        fi_scores[Q] = (q, S)
    s_self, t, m = timed(lambda: ek.self_scores(data, batch_size=bs), device)
    fi["self"] = (t, m)

    # Kronfluence
    task = _Task(loss_fn)
    kmodel = prepare_model(copy.deepcopy(model), task)
    kr = {}
    with tempfile.TemporaryDirectory() as out:
        an = Analyzer(analysis_name=name, model=kmodel, task=task, cpu=device == "cpu",
                      disable_tqdm=True, output_dir=out, log_level=logging.WARNING)
        dl = DataLoaderKwargs(num_workers=0)
        fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        sargs = ScoreArguments(damping_factor=None)
        ds = TensorDataset(*data)
        _, t, m = timed(lambda: an.fit_all_factors("f", ds, per_device_batch_size=bs,
                                                   dataloader_kwargs=dl, factor_args=fargs,
                                                   overwrite_output_dir=True), device)
        kr["fit"] = (t, m)
        for Q in n_queries:
            q, S = fi_scores[Q]
            qds = TensorDataset(*q)
            res, t, m = timed(lambda: an.compute_pairwise_scores(
                f"p{Q}", "f", qds, ds, per_device_query_batch_size=min(Q, 256),
                per_device_train_batch_size=bs, dataloader_kwargs=dl, score_args=sargs,
                overwrite_output_dir=True), device)
            kr[f"pairwise_{Q}q"] = (t, m)
            Sk = an.load_pairwise_scores(f"p{Q}")["all_modules"].float().cpu()
            rho = spearmanr(S.cpu().flatten().numpy(), Sk.flatten().numpy())[0]
            relerr = float((S.cpu() - Sk).abs().max() / Sk.abs().max())
            print(f"{name}: {Q} queries: Spearman {rho:.6f}, max rel diff {relerr:.2e}")
            rows.append(dict(device=dev_name, case=name, metric=f"spearman_{Q}q", fastinf=f"{rho:.6f}",
                             peer="", ratio=""))
        res, t, m = timed(lambda: an.compute_self_scores("s", "f", ds, per_device_train_batch_size=bs,
                                                         dataloader_kwargs=dl, score_args=sargs,
                                                         overwrite_output_dir=True), device)
        kr["self"] = (t, m)
        sk = an.load_self_scores("s")["all_modules"].float().cpu()
        rho = spearmanr(s_self.cpu().numpy(), sk.numpy())[0]
        print(f"{name}: self-scores Spearman {rho:.6f}")
        rows.append(dict(device=dev_name, case=name, metric="spearman_self", fastinf=f"{rho:.6f}",
                         peer="", ratio=""))
    for k in fi:
        (tf, mf), (tk, mk) = fi[k], kr[k]
        print(f"{name}: {k:>14}: fastinf {tf:8.3f}s  kronfluence {tk:8.3f}s  ratio {tf / tk:6.3f}"
              f"   peak mem {mf / 2**20:7.1f} MiB vs {mk / 2**20:7.1f} MiB")
        rows.append(dict(device=dev_name, case=name, metric=f"{k}_seconds", fastinf=f"{tf:.4f}",
                         peer=f"{tk:.4f}", ratio=f"{tf / tk:.4f}"))
        rows.append(dict(device=dev_name, case=name, metric=f"{k}_peak_mib", fastinf=f"{mf / 2**20:.1f}",
                         peer=f"{mk / 2**20:.1f}", ratio=f"{(mf / mk if mk > 0 else float('nan')):.3f}"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="smaller data (quick check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    dev_name = device_name(a.device)
    print(f"device: {dev_name}; torch {torch.__version__}; fastinf backends:\n{fastinf.backends()}")
    rows = []
    for case in (mlp_case(a.small), lm_case(a.small)):
        run_case(case, a.device, (16, 256), 64, rows, dev_name)
    for r in rows:
        r["peer_name"] = "kronfluence"
    append_rows("peers", rows)


if __name__ == "__main__":
    main()
