"""2-process gloo run (torchrun) == single-process: EKFAC.fit, GradientStore.build, scores, top-k."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.nn.functional as F
    from torch import nn
    import fastinf

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
        g = torch.Generator().manual_seed(1)
        train = torch.randn(30, 6, generator=g), torch.randint(0, 4, (30,), generator=g)
        q = torch.randn(3, 6, generator=g), torch.randint(0, 4, (3,), generator=g)
        loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")
        return model, train, q, loss

    def run(out_dir, tag):
        model, train, q, loss = setup()
        ek = fastinf.EKFAC(model, loss, progress=False).fit(train, 4)
        es = fastinf.GradientStore.build(os.path.join(out_dir, tag + "-ek"), ek, train,
                                         batch_size=4, shard_size=8, progress=False)
        tr = fastinf.TracIn(model, loss, progress=False)
        ts = fastinf.GradientStore.build(os.path.join(out_dir, tag + "-tr"), tr, train,
                                         batch_size=4, shard_size=8, progress=False)
        return dict(lam=[L["lam"] for L in ek.factors.values()],
                    ek_store=ek.pairwise_scores(q, es), ek_direct=ek.pairwise_scores(q, train),
                    ek_self=ek.self_scores(es),
                    ek_top=ek.top_influences(q, es, k=4), tr_top=tr.top_influences(q, train, k=4,
                                                                                   largest=False),
                    tr_store=tr.pairwise_scores(q, ts))

    if __name__ == "__main__":
        import torch.distributed as d
        d.init_process_group("gloo")
        res = run(sys.argv[1], "dist")
        torch.save(res, os.path.join(sys.argv[1], f"rank{d.get_rank()}.pt"))
        d.destroy_process_group()
""")


def test_two_process_gloo_equals_single(tmp_path):
    script = tmp_path / "dist_job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", str(script), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    try:
        import dist_job
    finally:
        sys.path.remove(str(tmp_path))
    single = dist_job.run(str(tmp_path), "single")
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()))

    for res in (r0, r1):             # every rank returns the same, complete result
        for a, b in zip(res["lam"], single["lam"]):
            close(a, b)
        for key in ("ek_store", "ek_direct", "ek_self", "tr_store"):
            close(res[key], single[key])
        for key in ("ek_top", "tr_top"):
            close(res[key][0], single[key][0])
            assert torch.equal(res[key][1], single[key][1])
    # the ranks wrote disjoint shards into one store; its manifest equals the single-process one
    man_d = json.loads((tmp_path / "dist-tr" / "manifest.json").read_text())
    man_s = json.loads((tmp_path / "single-tr" / "manifest.json").read_text())
    assert man_d == man_s
    assert not any(p.name.startswith("manifest.rank") for p in (tmp_path / "dist-tr").iterdir())
