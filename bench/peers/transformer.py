"""fastinf EK-FAC vs Kronfluence EK-FAC on transformer language models (issue 11, realistic shapes).

Cases: a 4-block pre-LN causal transformer of nn.Linear projections (d=256, MLP 4·d, T=48, vocab 384,
256 train × 256 queries, a third of the examples right-padded: attention mask + labels -100), and,
when transformers is installed, Hugging Face GPT-2 and Llama built from configs with random weights
(same d, layers, heads, T, vocab; Llama intermediate 688).

Both libraries track the same modules (fastinf's default tracked set, passed to Kronfluence's Task by
name; GPT-2's Conv1D layers are handed to Kronfluence converted to the equivalent nn.Linear, which is
all Kronfluence can track), use the empirical Fisher, the damping heuristic 0.1·mean(Λ) and the same
padding mask. Measured per case: fit, exact pairwise (all queries), rank-32 pairwise (fastinf
``query_rank=32`` vs Kronfluence ``ScoreArguments(query_gradient_low_rank=32)``), self-scores; Spearman
of the scores; fit cost in plain forward+backward passes over the train set.

The fit and the plain pass run ``--repeat`` times (default 3) in fresh processes per library, the
scoring steps ``--repeat-scores`` times (default 1), and the run of median time is reported (all runs' seconds in the CSV's ``runs`` column): on a shared
VM one fresh-process fit varies by up to ±30%. Every (library, step) runs in its own subprocess (factors saved to / loaded from disk outside the
timed region, except that Kronfluence's own API loads its factors and saves its scores inside its
calls), and its peak RSS is the child's ``ru_maxrss`` (``os.wait4``), so runs do not contaminate
each other. "setup" is the child's peak RSS before the step (imports, model, data); "step" is the
peak minus setup.

Install: kronfluence 1.0.1 declares torchvision, which pip would pair with a different torch; keep
yours with `pip install kronfluence==1.0.1 --no-deps` plus `pip install accelerate einops einconv
opt_einsum transformers peft -c <(pip freeze | grep ^torch==)`.

Usage: PYTHONPATH=. python bench/peers/transformer.py [--small] [--cases transformer,gpt2,llama]
Appends rows to bench/results/peers.csv (device, case, metric, fastinf, peer, ratio, shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
# bench/peers/kronfluence.py would shadow the kronfluence package: import this folder as `peers`.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from peers import _models as M  # noqa: E402

STEPS = ("fit", "pairwise", "pairwise_rank32", "self")
RANK = 32


# ----------------------------------------------------------------------------- worker (child)
def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tracked_names(ek):
    mods = getattr(ek, "tracked_modules", None)  # public listing once it exists (issue 11 item 1)
    return list(mods if mods is not None else ek.modules)


def _load(work: Path, case: str, s: M.Shapes, for_kronfluence: bool):
    model = M.build_model(case, s)
    model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
    if for_kronfluence:
        M.conv1d_to_linear(model)
    data = torch.load(work / "data.pt", weights_only=True)
    return model.eval(), data["train"], data["query"]


def _fastinf_step(step, work, case, s):
    import fastinf
    model, train, query = _load(work, case, s, False)
    kw = dict(token_mask_fn=M.token_mask_fn, progress=False)
    bs = s.batch_size
    setup = _maxrss_mib()
    info = {}
    if step == "fit":
        ek = fastinf.EKFAC(model, M.loss_fn, **kw)
        t0 = time.perf_counter()
        ek.fit(train, batch_size=bs)
        dt = time.perf_counter() - t0
        ek.save(work / "fastinf_factors.pt")
        names = _tracked_names(ek)
        named = dict(model.named_modules())
        info = dict(tracked=names, tracked_params=sum(p.numel() for n in names
                                                      for p in named[n].parameters(recurse=False)),
                    trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
        (work / "tracked.json").write_text(json.dumps(info))
        return dict(seconds=dt, setup_mib=setup, **info)
    ek = fastinf.EKFAC.load(work / "fastinf_factors.pt", model, M.loss_fn, **kw)
    S, dt = M.fastinf_score_step(ek, step, query, train, bs, RANK)
    torch.save(S.float().cpu(), work / f"fastinf_{step}.pt")
    return dict(seconds=dt, setup_mib=setup)


def _kronfluence_step(step, work, case, s):
    names = json.loads((work / "tracked.json").read_text())["tracked"]
    model, train, query = _load(work, case, s, True)
    dt, setup = M.kronfluence_step(model, names, train, query, step, s.batch_size, RANK, work,
                                   work / f"kronfluence_{step}.pt", before=_maxrss_mib)
    return dict(seconds=dt, setup_mib=setup)


def _plain_step(work, case, s):
    """Seconds of one plain forward+backward pass of the model over the train set (the unit of the
    fit cost), after one warm-up batch."""
    model, train, _ = _load(work, case, s, False)
    bs = s.batch_size
    batches = [tuple(t[i:i + bs] for t in train) for i in range(0, train[0].shape[0], bs)]
    M.loss_fn(model, batches[0]).sum().backward()
    setup = _maxrss_mib()
    t0 = time.perf_counter()
    for b in batches:
        model.zero_grad(set_to_none=True)
        M.loss_fn(model, b).sum().backward()
    return dict(seconds=time.perf_counter() - t0, setup_mib=setup)


def worker(spec):
    work, case, s = Path(spec["work"]), spec["case"], M.Shapes(**spec["shapes"])
    torch.manual_seed(0)
    if spec["lib"] == "plain":
        out = _plain_step(work, case, s)
    elif spec["lib"] == "fastinf":
        out = _fastinf_step(spec["step"], work, case, s)
    else:
        out = _kronfluence_step(spec["step"], work, case, s)
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver (parent)
def run_child(spec, timeout):
    """Runs one step in a fresh interpreter; returns its result dict with ``peak_mib`` (the child's
    ru_maxrss) added."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                             stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(_ROOT))
        t0 = time.time()
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - t0 > timeout:
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    res = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not res:
        raise RuntimeError(f"step {spec['lib']}/{spec.get('step')} of {spec['case']} failed "
                           f"(exit {p.returncode}):\n{text[-4000:]}")
    r = json.loads(res[-1][len("RESULT "):])
    r["peak_mib"] = ru.ru_maxrss / 1024
    return r


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy())[0])


def run_case(case, s, timeout, dev_name, rows, table, repeat=3, repeat_scores=1):
    with tempfile.TemporaryDirectory(prefix=f"fastinf_bench_{case}_") as tmp:
        work = Path(tmp)
        model = M.build_model(case, s)
        train = M.make_tokens(s.n_train, s, seed=1)
        query = M.make_tokens(s.n_query, s, seed=2)
        if case == "transformer":
            M.train_briefly(model, train, steps=20, batch_size=s.batch_size)
        torch.save(model.state_dict(), work / "model.pt")
        torch.save(dict(train=train, query=query), work / "data.pt")
        n_params = sum(p.numel() for p in model.parameters())
        del model

        def go(lib, step=None):
            """One step in fresh processes: ``repeat`` runs for the fit and the plain pass (their
            times swing by up to ±30% from process to process on a shared VM),
            ``repeat_scores`` for the scoring steps; the run of median time is kept, with every
            run's seconds in ``runs`` and the largest peak RSS of them."""
            n = repeat if step in (None, "fit") else repeat_scores
            runs = []
            for _ in range(n):
                t = time.time()
                r = run_child(dict(work=str(work), case=case, shapes=s.__dict__, lib=lib,
                                   step=step), timeout)
                print(f"  {case:>11} {lib:>11} {step or 'fwd+bwd':>16}: {r['seconds']:8.3f} s, "
                      f"peak RSS {r['peak_mib']:7.0f} MiB (setup {r['setup_mib']:6.0f}) "
                      f"[{time.time() - t:.0f} s]", flush=True)
                runs.append(r)
            r = dict(sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2])
            r["runs"] = [x["seconds"] for x in runs]
            r["peak_mib"] = max(x["peak_mib"] for x in runs)
            return r

        plain = go("plain")
        res = {}
        for step in STEPS:
            res[step] = (go("fastinf", step), go("kronfluence", step))
        info = res["fit"][0]
        shape_txt = (f"{s.describe()} params={n_params} tracked={len(info['tracked'])} modules/"
                     f"{info['tracked_params']} of {info['trainable_params']} trainable params")
        print(f"{case}: tracked {len(info['tracked'])} modules ({info['tracked_params']:,} of "
              f"{info['trainable_params']:,} trainable parameters): {', '.join(info['tracked'][:6])}"
              f"{' ...' if len(info['tracked']) > 6 else ''}")

        def row(metric, fi, kr, ratio=True, runs=None):
            r = dict(device=dev_name, case=f"{case}_lm", metric=metric, fastinf=f"{fi:.4f}",
                     peer="" if kr is None else f"{kr:.4f}",
                     ratio=f"{fi / kr:.4f}" if ratio and kr else "", peer_name="kronfluence",
                     shapes=shape_txt, runs=runs or "")
            rows.append(r)
            table.append((case, metric, fi, kr, fi / kr if ratio and kr else None))

        for step in STEPS:
            fi, kr = res[step]
            runs = (f"median of {len(fi['runs'])}: fastinf "
                    + " ".join(f"{x:.3f}" for x in fi["runs"]) + " / kronfluence "
                    + " ".join(f"{x:.3f}" for x in kr["runs"])) if len(fi["runs"]) > 1 else None
            row(f"{step}_seconds", fi["seconds"], kr["seconds"], runs=runs)
            row(f"{step}_peak_rss_mib", fi["peak_mib"], kr["peak_mib"])
            row(f"{step}_step_rss_mib", fi["peak_mib"] - fi["setup_mib"],
                kr["peak_mib"] - kr["setup_mib"])
        row("plain_fwd_bwd_pass_seconds", plain["seconds"], None,
            runs=" ".join(f"{x:.3f}" for x in plain["runs"]) if len(plain["runs"]) > 1 else None)
        row("fit_in_fwd_bwd_passes", res["fit"][0]["seconds"] / plain["seconds"],
            res["fit"][1]["seconds"] / plain["seconds"])
        ld = {f"{lib}_{st}": torch.load(work / f"{lib}_{st}.pt") for lib in ("fastinf", "kronfluence")
              for st in STEPS[1:]}
        row("spearman_pairwise_exact", spearman(ld["fastinf_pairwise"], ld["kronfluence_pairwise"]),
            None)
        row("spearman_pairwise_rank32", spearman(ld["fastinf_pairwise_rank32"],
                                                 ld["kronfluence_pairwise_rank32"]), None)
        row("spearman_rank32_vs_own_exact",
            spearman(ld["fastinf_pairwise_rank32"], ld["fastinf_pairwise"]),
            spearman(ld["kronfluence_pairwise_rank32"], ld["kronfluence_pairwise"]), ratio=False)
        row("spearman_self", spearman(ld["fastinf_self"], ld["kronfluence_self"]), None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="small shapes (quick check)")
    p.add_argument("--cases", default=",".join(M.CASES), help="comma-separated subset of "
                   + ",".join(M.CASES))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per step subprocess")
    p.add_argument("--no-csv", action="store_true", help="print only, do not append to the CSV")
    p.add_argument("--repeat", type=int, default=3, help="fresh-process runs of the fit and of "
                   "the plain pass per library (the median is reported)")
    p.add_argument("--repeat-scores", type=int, default=1, help="fresh-process runs of each "
                   "scoring step per library (the median is reported)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    from _util import append_rows, device_name
    import fastinf
    import importlib.metadata as md

    s = M.shapes(a.small)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in M.CASES]
    if bad:
        p.error(f"--cases: unknown {bad}; expected a subset of {list(M.CASES)}")
    try:
        import transformers  # noqa: F401
        versions = f"transformers {md.version('transformers')}"
    except ImportError:
        skipped = [c for c in cases if c in M.HF_CASES]
        cases = [c for c in cases if c not in M.HF_CASES]
        versions = "transformers not installed"
        if skipped:
            print(f"skipping {skipped}: transformers is not installed (pip install '.[bench]')")
    dev_name = device_name("cpu")
    print(f"device: {dev_name}; torch {torch.__version__}; kronfluence {md.version('kronfluence')}; "
          f"{versions}; fastinf {fastinf.__version__ if hasattr(fastinf, '__version__') else ''}\n"
          f"shapes: {s.describe()}; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows, table = [], []
    for case in cases:
        run_case(case, s, a.timeout, dev_name, rows, table, max(1, a.repeat),
                 max(1, a.repeat_scores))
    print(f"\nload average {os.getloadavg()[0]:.1f} at end (timings taken on a shared machine if > "
          f"{os.cpu_count()})\n")
    print(f"{'case':<12}{'metric':<32}{'fastinf':>12}{'kronfluence':>13}{'ratio':>9}")
    for case, metric, fi, kr, ratio in table:
        print(f"{case:<12}{metric:<32}{fi:>12.4g}{'' if kr is None else f'{kr:.4g}':>13}"
              f"{'' if ratio is None else f'{ratio:.3f}x':>9}")
    if not a.no_csv:
        append_rows("peers", rows)


if __name__ == "__main__":
    main()
