"""Data selection and cleaning with influence, measured by retraining (digits MLP, noisy labels).

The setup: scikit-learn's digits, 1400 training examples with 20 % of the labels flipped, the
demo's MLP trained on them (40 epochs SGD); the 397 held-out digits are split into a clean
validation set (the first 150, used as the target / validation of the selection) and a test set
(the other 247, used only to measure). Influence from fastinf EK-FAC and exact TracIn (3
checkpoints) on that model. Then, retraining a fresh model on the chosen examples with R seeds
(model init, data order and the random choices all change with the seed):

(a) ``selection.for_target(method, train, valid, fraction=0.5)`` (LESS defaults: cosine, max),
    the same with raw scores summed over the target (``normalize=None, aggregate="mean"``),
    a random half, and all the data;
(b) removing ``selection.harmful(method, train, valid, fraction=f)`` for f = 10 %, 20 % (and, for
    comparison, the top f by ``selection.suspicious``), against removing as many at random, and
    removing none;
(c) ``selection.suspicious(method, train, fraction=f)``: the share of the flipped labels found
    in the top 10 / 20 / 30 % by self-influence (random finds f).

Each figure is the mean ± std over the R retrain seeds (test accuracy and loss). An influence
choice "beats random" when its mean accuracy exceeds random's by more than the noise
``sqrt(std_influence² + std_random²)``; the table says where it does not. Rows are appended to
bench/results/quality.csv (tasks select / remove / suspicious).

Usage: python bench/quality/selection.py [--seeds 3] [--methods ekfac,tracin] [--no-save]
Runs single-threaded (small models train faster that way on shared cores): ~2 min on 2 cores.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import append_rows, device_name, print_table  # noqa: E402

import fastinf  # noqa: E402
from fastinf import demo, selection  # noqa: E402

EPOCHS, LR, NOISE, N_VALID = 40, 0.05, 0.2, 150


def retrain(Xtr, ytr, keep, Xte, yte, seed):
    """Test (accuracy, loss) of a fresh model trained on ``Xtr[keep]``."""
    model = demo.make_model(10_000 + seed)
    demo.train(model, Xtr[keep], ytr[keep], epochs=EPOCHS, lr=LR, seed=20_000 + seed)
    with torch.no_grad():
        out = model(Xte)
        return (float((out.argmax(1) == yte).float().mean()),
                float(torch.nn.functional.cross_entropy(out, yte)))


def summary(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="retrain seeds per figure (>= 3)")
    p.add_argument("--methods", default="ekfac,tracin")
    p.add_argument("--seed", type=int, default=0, help="data split / label noise / model seed")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    Xtr, ytr, Xho, yho, flipped = demo.load_digits_split(NOISE, args.seed)
    valid, (Xte, yte) = (Xho[:N_VALID], yho[:N_VALID]), (Xho[N_VALID:], yho[N_VALID:])
    train = (Xtr, ytr)
    n = len(ytr)
    model = demo.make_model(args.seed)
    ckpts = demo.train(model, Xtr, ytr, epochs=EPOCHS, lr=LR, seed=args.seed,
                       checkpoints_at=(EPOCHS // 3, 2 * EPOCHS // 3, EPOCHS))
    seeds = range(args.seeds)
    cache = {}

    def figure(keep_fn, label):
        """Mean/std test accuracy and loss of retraining on keep_fn(seed) over the seeds."""
        if label in cache:
            return cache[label]
        acc, loss, share = [], [], []
        for s in seeds:
            keep = keep_fn(s)
            a, l_ = retrain(Xtr, ytr, keep, Xte, yte, s)
            acc.append(a)
            loss.append(l_)
            share.append(float(flipped[keep].float().mean()))
        cache[label] = (summary(acc), summary(loss), statistics.mean(share))
        return cache[label]

    def random_keep(count, salt):
        return lambda s: torch.randperm(n, generator=torch.Generator().manual_seed(
            1000 * salt + s))[:count]

    def removed(idx):
        keep = torch.ones(n, dtype=torch.bool)
        keep[idx] = False
        return keep.nonzero().flatten()

    rows = []
    dev = device_name("cpu")

    def row(task, method, choice, frac, fig, base=None, extra=None):
        (am, asd), (lm, lsd), share = fig
        r = {"device": dev, "task": task, "method": method, "choice": choice, "fraction": frac,
             "seeds": args.seeds, "test_acc": am, "test_acc_std": asd, "test_loss": lm,
             "test_loss_std": lsd, "flipped_in_kept": share}
        if base is not None:
            (bm, bsd), _, _ = base
            noise = math.sqrt(asd ** 2 + bsd ** 2)
            r["vs_random"] = am - bm
            r["noise"] = noise
            r["beats_random"] = "yes" if am - bm > noise else "no"
        r.update(extra or {})
        rows.append(r)

    everything = figure(lambda s: torch.arange(n), "all")
    rand_half = figure(random_keep(n // 2, 1), "random-half")
    row("select", "-", "all", 1.0, everything)
    row("select", "random", "random", 0.5, rand_half)
    removal = {}
    for f in (0.1, 0.2):
        k = round(f * n)
        removal[f] = figure(lambda s, k=k: removed(random_keep(k, 2)(s)), f"random-remove-{f}")
        row("remove", "random", "random", f, removal[f])
    row("remove", "-", "none", 0.0, everything)

    for name in args.methods.split(","):
        t = time.perf_counter()
        if name == "ekfac":
            alg = fastinf.EKFAC(model, demo.loss_fn, progress=False).fit(train, batch_size=256)
        elif name == "tracin":
            alg = fastinf.TracIn(model, demo.loss_fn, checkpoints=ckpts, progress=False)
        else:
            raise SystemExit(f"--methods: unknown method {name!r} (ekfac, tracin)")
        for choice, kw in (("for_target cosine max", {}),
                           ("for_target raw mean", dict(normalize=None, aggregate="mean"))):
            idx, _ = selection.for_target(alg, train, valid, fraction=0.5, batch_size=256, **kw)
            row("select", name, choice, 0.5, figure(lambda s, idx=idx: idx, f"{name}-{choice}"),
                rand_half, {"seconds": time.perf_counter() - t})
        for f in (0.1, 0.2):
            for choice, (idx, _) in (
                    ("harmful", selection.harmful(alg, train, valid, fraction=f, batch_size=256)),
                    ("suspicious", selection.suspicious(alg, train, fraction=f, batch_size=256))):
                row("remove", name, choice, f, figure(lambda s, idx=idx: removed(idx),
                                                      f"{name}-{choice}-{f}"), removal[f],
                    {"flipped_in_removed": float(flipped[idx].float().mean())})
        rec = {}
        for f in (0.1, 0.2, 0.3):
            idx, _ = selection.suspicious(alg, train, fraction=f, batch_size=256)
            rec[f"found_top{round(f * 100)}%"] = float(flipped[idx].sum()) / float(flipped.sum())
        rows.append({"device": dev, "task": "suspicious", "method": name, **rec})
    rows.append({"device": dev, "task": "suspicious", "method": "random",
                 **{f"found_top{p}%": p / 100 for p in (10, 20, 30)}})
    print_table(rows, ["task", "method", "choice", "fraction", "test_acc", "test_acc_std",
                       "test_loss", "flipped_in_kept", "flipped_in_removed", "vs_random", "noise",
                       "beats_random",
                       "found_top10%", "found_top20%", "found_top30%"])
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if not args.no_save:
        append_rows("quality", rows)


if __name__ == "__main__":
    main()
