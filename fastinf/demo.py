"""``fastinf demo``: influence on real data in under a minute, offline.

Trains a small MLP on scikit-learn's bundled 8x8 digits with a fraction of the training labels
flipped, then

1. ranks the training examples by self-influence and reports how many flipped labels are found
   in the top 5/10/20 % (table + ``mislabel_curve.png`` against random inspection);
2. for a few test digits shows the top proponents and opponents (``proponents.png``);
3. retrains without the top 5/10/20 % by self-influence (``fastinf.selection.suspicious``) and
   without as many random examples, and plots test accuracy against the fraction removed
   (``removal_curve.png``);
4. writes ``report.json`` with every number and timing.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .ekfac import EKFAC
from .selection import suspicious
from .tracin import TracIn

METHODS = ("ekfac", "tracin")
FRACTIONS = (0.05, 0.10, 0.20)
REMOVED = (0.0, 0.05, 0.10, 0.20)


class DemoError(ValueError):
    """A user-facing problem with the demo's arguments or environment."""


def _need_extras():
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise DemoError(f"the demo needs scikit-learn and matplotlib ({exc.name} is missing): "
                        "pip install 'fastinf[demo]'") from None


def _writable_dir(out: str) -> Path:
    """Creates ``out`` and checks a file can be written there, before any work is done."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise DemoError(f"--out {out}: exists and is not a folder; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise DemoError(f"--out {out}: cannot write there ({exc.strerror or exc}); pass a "
                        "writable folder") from None
    return path


def load_digits_split(noise: float, seed: int):
    """Digits as float tensors in [0, 1]; 1400 train (``noise`` of them relabelled) / 397 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    Xtr, ytr, Xte, yte = X[tr], y[tr].clone(), X[te], y[te]
    n_flip = int(round(noise * len(ytr)))
    flipped = torch.randperm(len(ytr), generator=g)[:n_flip]
    shift = torch.randint(1, 10, (n_flip,), generator=g)
    ytr[flipped] = (ytr[flipped] + shift) % 10  # always a different class
    is_flipped = torch.zeros(len(ytr), dtype=torch.bool)
    is_flipped[flipped] = True
    return Xtr, ytr, Xte, yte, is_flipped


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def loss_fn(model, batch):
    """Per-example cross-entropy: the loss fastinf differentiates."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def train(model, X, y, *, epochs: int, lr: float, seed: int, checkpoints_at=()):
    """Mini-batch SGD with momentum; returns the (state_dict, lr) checkpoints asked for."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    ckpts = []
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        if epoch in checkpoints_at:
            ckpts.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, lr))
    model.eval()
    return ckpts


def detection(scores: torch.Tensor, is_flipped: torch.Tensor) -> Dict[str, float]:
    """Fraction of flipped labels found among the top x % by score (highest first)."""
    order = torch.argsort(scores, descending=True)
    total = int(is_flipped.sum())
    out = {}
    for f in FRACTIONS:
        k = int(round(f * len(scores)))
        out[f"top{int(f * 100)}%"] = float(is_flipped[order[:k]].sum()) / max(total, 1)
    return out


def detection_curve(scores, is_flipped):
    order = torch.argsort(scores, descending=True)
    found = torch.cumsum(is_flipped[order].float(), 0) / max(int(is_flipped.sum()), 1)
    x = torch.arange(1, len(scores) + 1, dtype=torch.float32) / len(scores)
    return x.tolist(), found.tolist()


def _plot_curve(curves: Dict[str, tuple], noise: float, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    ax.plot([0, 1], [0, 1], "k--", label="random")
    ax.axvline(noise, color="grey", lw=0.5)
    ax.set_xlabel("fraction of training set inspected (by self-influence)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(f"Mislabel detection, digits MLP, {noise:.0%} labels flipped", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def removal_curve(alg, train_data, Xtr, ytr, Xte, yte, *, epochs: int, seed: int) -> Dict:
    """Test accuracy of models retrained without the top f of the training set by
    self-influence (``fastinf.selection.suspicious``) and without f at random, f in REMOVED."""
    order = suspicious(alg, train_data, fraction=1.0, batch_size=256)[0].cpu()
    rand = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed + 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small retrainings run faster single-threaded
    try:
        def accuracy(drop):
            keep = torch.ones(len(ytr), dtype=torch.bool)
            keep[drop] = False
            model = make_model(seed + 1)
            train(model, Xtr[keep], ytr[keep], epochs=epochs, lr=0.05, seed=seed + 1)
            with torch.no_grad():
                return float((model(Xte).argmax(1) == yte).float().mean())

        out = {"fraction": list(REMOVED), "influence": [], "random": []}
        for f in REMOVED:
            k = int(round(f * len(ytr)))
            out["influence"].append(accuracy(order[:k]))
            out["random"].append(out["influence"][0] if k == 0 else accuracy(rand[:k]))
        return out
    finally:
        torch.set_num_threads(threads)


def _plot_removal(curve: Dict, method: str, noise: float, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(curve["fraction"], curve["influence"], "o-", label=f"highest self-influence ({method})")
    ax.plot(curve["fraction"], curve["random"], "s--", color="k", label="random")
    ax.set_xlabel("fraction of training set removed before retraining")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(curve["fraction"])
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(f"Retraining without suspicious examples, {noise:.0%} labels flipped\n"
                 "(one retraining per point: differences of ~1 % are seed noise)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_grid(Xte, yte, Xtr, ytr, is_flipped, queries, scores, method, k, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + 2 * k
    fig, axes = plt.subplots(len(queries), cols, figsize=(1.3 * cols, 1.6 * len(queries)), dpi=110)
    axes = axes.reshape(len(queries), cols)
    for r, q in enumerate(queries):
        order = torch.argsort(scores[r], descending=True)
        cells = [("test", Xte[q], f"test #{q}\nlabel {int(yte[q])}", "black")]
        for i in order[:k].tolist():
            cells.append(("pro", Xtr[i], f"+{scores[r, i]:.3g}\nlabel {int(ytr[i])}",
                          "red" if is_flipped[i] else "green"))
        for i in order.flip(0)[:k].tolist():
            cells.append(("opp", Xtr[i], f"{scores[r, i]:.3g}\nlabel {int(ytr[i])}",
                          "red" if is_flipped[i] else "blue"))
        for c, (_, img, title, color) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(img.reshape(8, 8), cmap="gray_r")
            ax.set_title(title, fontsize=7, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{method}: test digit | top {k} proponents | top {k} opponents "
                 "(red = flipped label)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(method: str = "both", noise: float = 0.1, out: str = "fastinf_demo", device: str = "cpu",
        seed: int = 0, progress: bool = True, epochs: int = 40) -> Dict:
    """Runs the demo and returns the report (also written to ``out/report.json``)."""
    if method not in METHODS + ("both",):
        raise DemoError(f"unknown method {method!r}; expected ekfac, tracin or both")
    if not 0.0 <= noise < 0.9:
        raise DemoError(f"noise must be in [0, 0.9), got {noise}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DemoError(f"device {device!r} asked for, but no CUDA device is visible")
    _need_extras()
    outdir = _writable_dir(out)
    methods: List[str] = list(METHODS) if method == "both" else [method]
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    Xtr, ytr, Xte, yte, is_flipped = load_digits_split(noise, seed)
    model = make_model(seed)
    ckpts = train(model, Xtr, ytr, epochs=epochs, lr=0.05, seed=seed,
                  checkpoints_at=(epochs // 3, 2 * epochs // 3, epochs))
    timings["train_s"] = time.perf_counter() - t
    model = model.to(device)
    dev = torch.device(device)
    train_data = (Xtr.to(dev), ytr.to(dev))
    with torch.no_grad():
        test_acc = float((model(Xte.to(dev)).argmax(1).cpu() == yte).float().mean())
        train_acc_clean = float((model(Xtr.to(dev)).argmax(1).cpu() == ytr)[~is_flipped].float().mean())
    queries = [0, 1, 2, 3]
    query_data = (Xte[queries].to(dev), yte[queries].to(dev))
    report = {
        "config": {"method": method, "noise": noise, "seed": seed, "device": device,
                   "epochs": epochs, "n_train": len(ytr), "n_test": len(yte),
                   "n_flipped": int(is_flipped.sum()), "fastinf": __version__,
                   "torch": torch.__version__},
        "model": {"test_accuracy": test_acc, "train_accuracy_clean_labels": train_acc_clean},
        "detection": {}, "timings": timings, "top_influences": {},
    }
    curves = {}
    for name in methods:
        t = time.perf_counter()
        if name == "ekfac":
            alg = EKFAC(model, loss_fn, progress=progress)
            alg.fit(train_data, batch_size=256)
            timings["ekfac_fit_s"] = time.perf_counter() - t
        else:
            ck = [({k: v.to(dev) for k, v in sd.items()}, lr) for sd, lr in ckpts]
            alg = TracIn(model, loss_fn, checkpoints=ck, progress=progress)
        t = time.perf_counter()
        self_inf = alg.self_scores(train_data, batch_size=256).cpu()
        timings[f"{name}_self_scores_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pair = alg.pairwise_scores(query_data, train_data, batch_size=256).cpu()
        timings[f"{name}_pairwise_s"] = time.perf_counter() - t
        report["detection"][name] = detection(self_inf, is_flipped)
        curves[name] = detection_curve(self_inf, is_flipped)
        k = 4
        report["top_influences"][name] = [
            {"test_index": q, "label": int(yte[q]),
             "proponents": torch.argsort(pair[r], descending=True)[:k].tolist(),
             "opponents": torch.argsort(pair[r])[:k].tolist()}
            for r, q in enumerate(queries)]
        _plot_grid(Xte, yte, Xtr, ytr, is_flipped, queries, pair, name, k,
                   outdir / f"proponents_{name}.png")
        if name == methods[0]:
            t = time.perf_counter()
            report["removal"] = {"method": name, **removal_curve(
                alg, train_data, Xtr, ytr, Xte, yte, epochs=epochs, seed=seed)}
            timings["removal_retrain_s"] = time.perf_counter() - t
            _plot_removal(report["removal"], name, noise, outdir / "removal_curve.png")
    report["detection"]["random"] = {f"top{int(f * 100)}%": f for f in FRACTIONS}
    _plot_curve(curves, noise, outdir / "mislabel_curve.png")
    with open(outdir / "report.json", "w") as fh:
        json.dump(report, fh, indent=2)
    return report


def format_report(report: Dict, out: str) -> str:
    lines = [f"digits MLP: test accuracy {report['model']['test_accuracy']:.3f}, "
             f"{report['config']['n_flipped']} of {report['config']['n_train']} training labels flipped",
             "", "flipped labels found in the top x% by self-influence:",
             f"  {'method':<8}" + "".join(f"{k:>9}" for k in ("top5%", "top10%", "top20%"))]
    for name, d in report["detection"].items():
        lines.append(f"  {name:<8}" + "".join(f"{d[k]:>9.1%}" for k in ("top5%", "top10%", "top20%")))
    rm = report.get("removal")
    if rm:
        lines += ["", f"test accuracy after removing the top x% by self-influence ({rm['method']}) "
                  "and retraining:", "  " + " " * 9 + "".join(f"{f:>9.0%}" for f in rm["fraction"])]
        for key in ("influence", "random"):
            lines.append(f"  {key:<9}" + "".join(f"{a:>9.3f}" for a in rm[key]))
    lines.append("")
    lines.append("timings: " + ", ".join(f"{k} {v:.2f}" for k, v in report["timings"].items()))
    lines.append(f"wrote {out}/report.json, {out}/mislabel_curve.png, {out}/removal_curve.png, "
                 f"{out}/proponents_*.png")
    return "\n".join(lines)
