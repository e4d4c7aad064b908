"""Quality benchmark on the digits MLP: Linear Datamodeling Score (LDS) and mislabel detection.

LDS: retrain the model on M random 50 % subsets of the training set (cached on disk with a
manifest, so it is computed once), record each retrained model's loss on every test example,
and report the mean over test examples of the Spearman correlation across subsets between the
actual loss and the loss the attribution predicts (``-Σ_{i∈subset} score(test, i)``: positive
scores are helpful, they lower the loss).

Mislabel detection: with 10 % of the labels flipped, the fraction of flipped labels found in the
top 5/10/20 % of training examples by self-influence, per method, against random.

Methods: fastinf EK-FAC, fastinf TracIn (exact, and projected), Kronfluence EK-FAC when installed,
and ``fastinf.Ensemble`` of the EK-FACs of 5 independently seeded models (the first is the single
model above; raw mean, and ``Ensemble.balanced`` weights).
Results are appended to bench/results/quality.csv.

Usage: python bench/quality/lds.py [--subsets 50] [--quick]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import append_rows, device_name, print_table  # noqa: E402

import fastinf  # noqa: E402
from fastinf import demo  # noqa: E402

CACHE = Path(__file__).resolve().parent / "cache"
EPOCHS = 40
LR = 0.05


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman correlation along dim 0 (columns are independent problems)."""
    rx = x.argsort(0).argsort(0).double()
    ry = y.argsort(0).argsort(0).double()
    rx -= rx.mean(0)
    ry -= ry.mean(0)
    return (rx * ry).sum(0) / (rx.norm(dim=0) * ry.norm(dim=0)).clamp_min(1e-12)


def retrain_losses(Xtr, ytr, Xte, yte, subsets: int, seed: int, n_test: int):
    """Test losses [M, n_test] of models retrained on M random halves, cached with a manifest."""
    key = hashlib.sha256(json.dumps({"n": len(ytr), "m": subsets, "seed": seed, "epochs": EPOCHS,
                                     "lr": LR, "n_test": n_test, "y": ytr.tolist()}).encode()
                         ).hexdigest()[:16]
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"lds_{key}.pt"
    if path.exists():
        blob = torch.load(path)
        return blob["masks"], blob["losses"]
    g = torch.Generator().manual_seed(seed + 1)
    masks = torch.zeros(subsets, len(ytr), dtype=torch.bool)
    losses = torch.zeros(subsets, n_test)
    t = time.perf_counter()
    for m in range(subsets):
        idx = torch.randperm(len(ytr), generator=g)[: len(ytr) // 2]
        masks[m, idx] = True
        model = demo.make_model(seed + 100 + m)
        demo.train(model, Xtr[idx], ytr[idx], epochs=EPOCHS, lr=LR, seed=seed + m)
        with torch.no_grad():
            losses[m] = demo.loss_fn(model, (Xte[:n_test], yte[:n_test]))
        print(f"\rretrained {m + 1}/{subsets} ({time.perf_counter() - t:.0f} s)", end="", flush=True)
    print()
    torch.save({"masks": masks, "losses": losses}, path)
    with open(CACHE / f"lds_{key}.json", "w") as fh:
        json.dump({"key": key, "subsets": subsets, "seed": seed, "epochs": EPOCHS, "lr": LR,
                   "n_train": len(ytr), "n_test": n_test, "file": path.name}, fh, indent=2)
    return masks, losses


def lds(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> float:
    """scores [n_test, n_train]; predicted loss of subset m on test z: -Σ_{i∈m} scores[z, i]."""
    predicted = -(masks.double() @ scores.double().T)  # [M, n_test]
    return float(spearman(predicted, losses.double()).mean())


def kronfluence_scores(model, train, query, n_train):
    """Kronfluence EK-FAC pairwise and self scores on the same model (None if not installed)."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError:
        return None
    import copy
    import tempfile

    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    class ClsTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits, -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    m = prepare_model(copy.deepcopy(model), ClsTask())
    with tempfile.TemporaryDirectory() as tmp:
        an = Analyzer("lds", m, ClsTask(), output_dir=tmp, disable_tqdm=True, disable_model_save=True)
        fa = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        tr, qu = TensorDataset(*train), TensorDataset(*query)
        an.fit_all_factors("f", tr, per_device_batch_size=256, factor_args=fa, overwrite_output_dir=True)
        sa = ScoreArguments(damping_factor=None)  # 0.1·mean(Λ), the heuristic fastinf uses too
        an.compute_pairwise_scores("p", "f", qu, tr, per_device_query_batch_size=64,
                                   per_device_train_batch_size=256, score_args=sa,
                                   overwrite_output_dir=True)
        pair = an.load_pairwise_scores("p")["all_modules"]
        an.compute_self_scores("s", "f", tr, per_device_train_batch_size=256, score_args=sa,
                               overwrite_output_dir=True)
        self_ = an.load_self_scores("s")["all_modules"]
    return pair, self_


ENSEMBLE = 5


def ensemble_members(model, train, seed):
    """EK-FACs of ``model`` and of ENSEMBLE - 1 more models trained with other seeds."""
    models = [model]
    for i in range(1, ENSEMBLE):
        models.append(demo.make_model(seed + 1000 * i))
        demo.train(models[-1], *train, epochs=EPOCHS, lr=LR, seed=seed + 1000 * i)
    return [fastinf.EKFAC(m, demo.loss_fn, progress=False).fit(train, batch_size=256)
            for m in models]


def method_scores(name, model, ckpts, train, query, members=None):
    loss_fn = demo.loss_fn
    if name == f"ekfac-ensemble{ENSEMBLE}":
        alg = fastinf.Ensemble(members)
    elif name == f"ekfac-ensemble{ENSEMBLE}-balanced":
        alg = fastinf.Ensemble.balanced(members, train, batch_size=256)
    elif name == "ekfac":
        alg = fastinf.EKFAC(model, loss_fn, progress=False)
        alg.fit(train, batch_size=256)
    elif name == "tracin":
        alg = fastinf.TracIn(model, loss_fn, checkpoints=ckpts, progress=False)
    elif name == "tracin-proj":
        alg = fastinf.TracIn(model, loss_fn, checkpoints=ckpts, progress=False,
                             projection=fastinf.KroneckerProjection(16, 8, seed=0))
    elif name == "kronfluence":
        return kronfluence_scores(model, train, query, len(train[1]))
    else:
        raise ValueError(name)
    return alg.pairwise_scores(query, train, batch_size=256), alg.self_scores(train, batch_size=256)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subsets", type=int, default=50)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="10 subsets, 50 test examples")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.subsets, args.n_test = 10, 50
    torch.manual_seed(args.seed)
    methods = ["ekfac", "tracin", "tracin-proj", "kronfluence", f"ekfac-ensemble{ENSEMBLE}",
               f"ekfac-ensemble{ENSEMBLE}-balanced"]
    rows = []
    # LDS on clean labels, mislabel detection at 10 % noise.
    for task, noise in (("lds", 0.0), ("mislabel", 0.1)):
        Xtr, ytr, Xte, yte, flipped = demo.load_digits_split(noise, args.seed)
        model = demo.make_model(args.seed)
        ckpts = demo.train(model, Xtr, ytr, epochs=EPOCHS, lr=LR, seed=args.seed,
                           checkpoints_at=(EPOCHS // 3, 2 * EPOCHS // 3, EPOCHS))
        train, query = (Xtr, ytr), (Xte[: args.n_test], yte[: args.n_test])
        if task == "lds":
            masks, losses = retrain_losses(Xtr, ytr, Xte, yte, args.subsets, args.seed, args.n_test)
        t = time.perf_counter()
        members = ensemble_members(model, train, args.seed)
        members_s = time.perf_counter() - t  # training + fitting the ensemble's members
        for name in methods:
            t = time.perf_counter() - (members_s if name.startswith("ekfac-ensemble") else 0.0)
            res = method_scores(name, model, ckpts, train, query, members)
            if res is None:
                print(f"{name}: not installed, skipped")
                continue
            pair, self_ = (r.detach().cpu().float() for r in res)
            dt = time.perf_counter() - t
            row = {"device": device_name("cpu"), "task": task, "method": name, "seconds": dt}
            if task == "lds":
                row["lds"] = lds(pair, masks, losses)
                row["subsets"] = args.subsets
            else:
                det = demo.detection(self_, flipped)
                row.update({f"found_{k}": v for k, v in det.items()})
            rows.append(row)
    print_table(rows, ["task", "method", "lds", "found_top5%", "found_top10%", "found_top20%", "seconds"])
    if not args.no_save:
        append_rows("quality", rows)


if __name__ == "__main__":
    main()
