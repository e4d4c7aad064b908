"""EK-FAC cost on real layer shapes: this tree vs a base commit (and optionally Kronfluence).

A 4-block pre-LN causal transformer made of ``nn.Linear`` projections (d=256, MLP 4·d, T=48,
vocab 384, a third of the examples right-padded), 256 train × 256 queries, batch 32. Steps, each
in a fresh interpreter (peak RSS = the child's ru_maxrss): ``plain`` (one forward+backward pass
over the train set: the unit of the fit cost), ``fit``, ``pairwise`` (exact, 256 queries),
``pairwise_rank32`` (``query_rank=32``), ``self``. Each step is run ``--reps`` times, the
fastest kept. ``--base`` (default 34f0503) is exported with ``git archive`` into a temporary
folder (the compiled module copied from this tree) and measured in the same run; the ratio
is this tree / base. ``--kronfluence`` adds Kronfluence (EK-FAC, empirical Fisher, damping
heuristic, same batch sizes) and the ratio this tree / Kronfluence.

    PYTHONPATH=. python bench/e2e/ekfac_cost.py [--small] [--reps 2] [--kronfluence]
        [--n-train 256] [--n-query 256] [--threads 1]

Rows are appended to ``bench/results/ekfac_cost.csv``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
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
loss_fn, token_mask_fn = M.loss_fn, M.token_mask_fn

STEPS = ("plain", "fit", "pairwise", "pairwise_rank32", "self")
RANK = 32


# ----------------------------------------------------------------------------- model and data
# The same pre-LN transformer, tokens and loss as bench/peers/transformer.py (bench/peers/_models.py).
def _shapes(s) -> M.Shapes:
    return M.Shapes(n_train=s["n_train"], n_query=s["n_query"], T=s["T"], d=s["d"],
                    layers=s["layers"], heads=s["heads"], vocab=s["vocab"], mlp=4 * s["d"],
                    batch_size=s["batch"])


def setup(work: Path, s):
    sh = _shapes(s)
    torch.manual_seed(0)
    model = M.CausalLM(sh)
    train, query = M.make_tokens(sh.n_train, sh, 1), M.make_tokens(sh.n_query, sh, 2)
    M.train_briefly(model, train, 10, sh.batch_size)  # away from the symmetric initialisation
    torch.save(model.state_dict(), work / "model.pt")
    torch.save(dict(train=train, query=query), work / "data.pt")


# ----------------------------------------------------------------------------- steps (children)
def _load(work, s):
    model = M.CausalLM(_shapes(s))
    model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
    d = torch.load(work / "data.pt", weights_only=True)
    return model.eval(), d["train"], d["query"]


def _names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def step_fastinf(step, work, s, tag):
    import fastinf
    model, train, query = _load(work, s)
    bs = s["batch"]
    if step == "plain":
        batches = [tuple(t[i:i + bs] for t in train) for i in range(0, s["n_train"], bs)]
        t0 = time.perf_counter()
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, b).sum().backward()
        return time.perf_counter() - t0
    kw = dict(token_mask_fn=token_mask_fn, progress=False)
    fpath = work / f"factors_{tag}.pt"
    if step == "fit":
        ek = fastinf.EKFAC(model, loss_fn, modules=_names(model), **kw)
        t0 = time.perf_counter()
        ek.fit(train, batch_size=bs)
        dt = time.perf_counter() - t0
        ek.save(fpath)
        return dt
    ek = fastinf.EKFAC.load(fpath, model, loss_fn, **kw)
    S, dt = M.fastinf_score_step(ek, step, query, train, bs, RANK)
    torch.save(S, work / f"{tag}_{step}.pt")
    return dt


def step_kronfluence(step, work, s, tag):
    model, train, query = _load(work, s)
    return M.kronfluence_step(model, _names(model), train, query, step, s["batch"], RANK, work,
                              work / f"{tag}_{step}.pt")[0]


def worker(spec):
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    fn = step_kronfluence if spec["tag"] == "kronfluence" else step_fastinf
    dt = fn(spec["step"], Path(spec["work"]), spec["shapes"], spec["tag"])
    print("RESULT " + json.dumps(dict(seconds=dt)), flush=True)


def run_child(spec, root: Path):
    env = dict(os.environ, PYTHONPATH=str(root))
    p = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    out = p.stdout.read().decode()
    _, status, ru = os.wait4(p.pid, 0)
    res = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if os.waitstatus_to_exitcode(status) != 0 or not res:
        raise RuntimeError(f"{spec['tag']}/{spec['step']} failed:\n{out[-4000:]}")
    return json.loads(res[-1][7:])["seconds"], ru.ru_maxrss / 1024


# ----------------------------------------------------------------------------- driver
def export_base(commit: str, dest: Path) -> Path:
    arch = subprocess.run(["git", "-C", str(_ROOT), "archive", commit], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    for so in (_ROOT / "fastinf").glob("_C*.so"):
        shutil.copy(so, dest / "fastinf" / so.name)
    return dest


def spearman(a, b):
    from scipy.stats import spearmanr
    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy())[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--base", default="34f0503")
    ap.add_argument("--kronfluence", action="store_true")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-query", type=int)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in each step (0: torch's default); 1 is steadier on a "
                         "machine shared with other jobs")
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    s = dict(n_train=256, n_query=256, T=48, d=256, layers=4, heads=4, vocab=384, batch=32)
    if args.small:
        s = dict(n_train=48, n_query=24, T=16, d=64, layers=2, heads=2, vocab=96, batch=16)
    s["n_train"] = args.n_train or s["n_train"]
    s["n_query"] = args.n_query or s["n_query"]
    wanted = set(args.steps.split(","))
    if wanted & {"pairwise", "pairwise_rank32", "self"}:
        wanted.add("fit")   # the scoring steps load the factors the fit step saved
    steps = [x for x in STEPS if x in wanted]
    with tempfile.TemporaryDirectory() as tmp:
        work, base = Path(tmp) / "work", Path(tmp) / "base"
        work.mkdir(), base.mkdir()
        setup(work, s)
        impls = {"after": _ROOT, "before": export_base(args.base, base)}
        if args.kronfluence:
            impls["kronfluence"] = _ROOT
        best = {}
        for rep in range(args.reps):
            for step in steps:
                for tag, root in impls.items():
                    if step == "plain" and tag != "after":
                        continue
                    dt, rss = run_child(dict(step=step, work=str(work), shapes=s, tag=tag, threads=args.threads), root)
                    old = best.get((tag, step), (math.inf, 0))
                    best[(tag, step)] = (min(old[0], dt), max(old[1], rss))
                    print(f"rep {rep} {tag:<12}{step:<17}{dt:8.2f} s {rss:8.0f} MiB", flush=True)
        dev = device_name("cpu")
        load = os.getloadavg()[0]
        rows = []
        plain = best.get(("after", "plain"), (math.nan,))[0]
        if args.threads:
            dev = dev.replace(f"({torch.get_num_threads()} threads)", f"({args.threads} threads)")
        print(f"\n{dev}; shapes {s}; min of {args.reps}; load average {load:.1f} "
              f"(shared machine: timings under load)")
        print(f"{'step':<17}{'after s':>9}{'before s':>9}{'ratio':>7}"
              f"{'after MiB':>10}{'before MiB':>11}" + ("  kronf s  ratio kronf MiB" if args.kronfluence else ""))
        for step in steps:
            a, b = best.get(("after", step)), best.get(("before", step), (math.nan, math.nan))
            k = best.get(("kronfluence", step), (math.nan, math.nan))
            line = f"{step:<17}{a[0]:9.2f}{b[0]:9.2f}{a[0] / b[0]:7.2f}{a[1]:10.0f}{b[1]:11.0f}"
            if args.kronfluence:
                line += f"{k[0]:9.2f}{a[0] / k[0]:7.2f}{k[1]:9.0f}"
            if step == "fit":
                line += f"   fit = {a[0] / plain:.1f} (before {b[0] / plain:.1f}) plain fwd+bwd passes"
            print(line)
            rows.append(dict(device=dev, case="transformer" + ("_small" if args.small else ""),
                             step=step, shapes=json.dumps(s), after_s=f"{a[0]:.3f}",
                             before_s=f"{b[0]:.3f}", ratio_before=f"{a[0] / b[0]:.3f}",
                             after_peak_mib=f"{a[1]:.0f}", before_peak_mib=f"{b[1]:.0f}",
                             kronfluence_s=f"{k[0]:.3f}", ratio_kronfluence=f"{a[0] / k[0]:.3f}",
                             kronfluence_peak_mib=f"{k[1]:.0f}", passes=f"{a[0] / plain:.2f}",
                             base=args.base, load=f"{load:.1f}"))
        for step in ("pairwise", "pairwise_rank32", "self"):
            fa, fb = work / f"after_{step}.pt", work / f"before_{step}.pt"
            if fa.exists() and fb.exists():
                A, B = torch.load(fa), torch.load(fb)
                d = float((A - B).abs().max() / B.abs().max())
                extra = ""
                fk = work / f"kronfluence_{step}.pt"
                if fk.exists():
                    extra = f", Spearman vs Kronfluence {spearman(A, torch.load(fk)):.4f}"
                print(f"{step}: max |after - before| / max |before| = {d:.2e}{extra}")
        if not args.no_save:
            append_rows("ekfac_cost", rows)


if __name__ == "__main__":
    main()
