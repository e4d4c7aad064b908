"""GradientStore: store scores == direct scores, streaming top-k, kill-and-resume, corruption,
mismatches, read-only directories, concurrent readers."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fastinf
from fastinf import GradientStore, StoreError
from fastinf.layers import DenseLayer, LayerBatch, Query, score

from _models import TinyTransformer, ce_loss, tf_loss, token_data

ROOT = Path(__file__).resolve().parents[1]


def mlp_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def tf_data(n, seed):
    return token_data(torch.Generator().manual_seed(seed), n)


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))


def _checkpoints(make):
    cks = []
    for i, lr in enumerate((0.5, 0.1)):
        m = make(seed=10 + i)
        cks.append(({k: v.clone() for k, v in m.state_dict().items()}, lr))
    return cks


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


# --------------------------------------------------------------------------- store == direct
def _methods(case):
    if case.startswith("tf"):
        d = 8 if case == "tf8" else 16
        torch.manual_seed(0)
        model = TinyTransformer(d=d)
        loss, data, mask_fn = tf_loss, tf_data, (lambda b: b[1])
        make = None
    else:
        model, loss, data, mask_fn = make_mlp(), ce_loss, mlp_data, None
        make = make_mlp
    return model, loss, data, mask_fn, make


@pytest.mark.parametrize("case", ["mlp", "tf8", "tf16"])
@pytest.mark.parametrize("kind", ["ekfac", "tracin", "tracin_ckpts", "tracin_kron"])
def test_store_scores_equal_direct(tmp_path, case, kind):
    if case != "mlp" and kind == "tracin_ckpts":
        pytest.skip("checkpoints covered on the MLP")
    model, loss, data, mask_fn, make = _methods(case)
    train, query = data(22, 1), data(5, 2)
    if kind == "ekfac":
        m = fastinf.EKFAC(model, loss, token_mask_fn=mask_fn, progress=False).fit(train, 4)
    elif kind == "tracin":
        m = fastinf.TracIn(model, loss, token_mask_fn=mask_fn, progress=False)
    elif kind == "tracin_ckpts":
        m = fastinf.TracIn(model, loss, checkpoints=_checkpoints(make), progress=False)
    else:
        m = fastinf.TracIn(model, loss, token_mask_fn=mask_fn, progress=False,
                           projection=fastinf.KroneckerProjection(3, 2, seed=1))
    store = GradientStore.build(tmp_path / "s", m, train, batch_size=4, shard_size=8,
                                progress=False)
    assert len(store) == 22 and len(store.shards) == 3
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    if case == "tf8" and kind != "tracin_kron":
        assert man["layouts"]["proj"] == "dense" and man["layouts"]["head"] == "factors"
    if case == "tf16" and kind != "tracin_kron":
        assert man["layouts"]["qkv"] == "factors"      # masked tokens dropped, offsets stored
    direct = m.pairwise_scores(query, train, batch_size=4)
    _close(m.pairwise_scores(query, store, batch_size=4), direct)
    reopened = GradientStore.open(tmp_path / "s")
    _close(m.pairwise_scores(query, reopened), direct)
    _close(m.self_scores(reopened), m.self_scores(train, batch_size=4))


@pytest.mark.parametrize("layout", ["factors", "dense"])
def test_low_rank_queries_from_a_store(tmp_path, layout):
    """EK-FAC rank-r queries (factor records) against stored factors and stored dense gradients
    give the direct scores."""
    torch.manual_seed(0)
    model = TinyTransformer(d=8)
    train, query = tf_data(22, 1), tf_data(5, 2)
    ek = fastinf.EKFAC(model, tf_loss, token_mask_fn=lambda b: b[1], progress=False).fit(train, 4)
    store = GradientStore.build(tmp_path / "s", ek, train, batch_size=4, shard_size=8,
                                progress=False, layout=layout)
    for r in (1, 3):
        direct = ek.pairwise_scores(query, train, batch_size=4, query_rank=r)
        _close(ek.pairwise_scores(query, store, query_rank=r), direct)
        v, i = ek.top_influences(query, store, k=4, query_rank=r)
        _close(v, torch.topk(direct, 4, dim=1).values)


def test_layer_records_contract_alike():
    """layers.score: factors x factors (both orders of the planner), factors x dense, dense x
    factors, dense x dense, all equal to <D_q, D_n> from the float64 dense gradients."""
    g = torch.Generator().manual_seed(3)
    train = LayerBatch(torch.randn(5, 4, 7, generator=g), torch.randn(5, 4, 3, generator=g),
                       torch.rand(5, 4, generator=g) > 0.3)
    query = LayerBatch(torch.randn(2, 6, 7, generator=g), torch.randn(2, 6, 3, generator=g),
                       torch.rand(2, 6, generator=g) > 0.3)
    want = train.to(torch.float64).dense().flatten(1) @ query.to(torch.float64).dense().flatten(1).T
    got = []
    for use_dense in (False, True):
        q = Query(query)
        q.use_dense = use_dense
        got.append(score(train, q, torch.float32))
    got.append(score(DenseLayer(train.dense()), Query(query), torch.float32))
    got.append(score(train, Query(DenseLayer(query.dense())), torch.float32))
    got.append(score(DenseLayer(train.dense()), Query(DenseLayer(query.dense())), torch.float32))
    for s in got:
        assert s.shape == (5, 2)
        _close(s.double(), want)


# --------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("source", ["store", "train"])
def test_top_influences_matches_full_topk(tmp_path, source):
    model = make_mlp()
    train, query = mlp_data(30, 1), mlp_data(4, 2)
    m = fastinf.EKFAC(model, ce_loss, progress=False).fit(train, 8)
    src = train if source == "train" else GradientStore.build(
        tmp_path / "s", m, train, batch_size=4, shard_size=8, progress=False)
    full = m.pairwise_scores(query, train, batch_size=4)
    kw = dict(batch_size=4)
    if source == "train":
        kw["chunk"] = 8   # several chunks even for this small train set
    for largest in (True, False):
        v, i = _topk(m, query, src, 5, largest, None, kw)
        rv, _ = torch.topk(full, 5, dim=1, largest=largest)
        _close(v, rv)
        _close(torch.gather(full, 1, i), rv)
    # per-query restriction and one shared restriction
    per_q = [torch.tensor([0, 3, 9, 17, 29, 11]), torch.arange(10, 20), torch.tensor([5, 6]),
             torch.arange(30)]
    v, i = _topk(m, query, src, 3, False, per_q, kw)
    for q, idx in enumerate(per_q):
        sub = full[q, idx]
        kk = min(3, idx.numel())
        rv, _ = torch.topk(sub, kk, largest=False)
        _close(v[q, :kk], rv)
        assert set(i[q, :kk].tolist()) <= set(idx.tolist())
        if kk < 3:
            assert torch.isnan(v[q, kk:]).all() and (i[q, kk:] == -1).all()
    shared = torch.tensor([1, 2, 4, 8, 16, 25])
    v, i = _topk(m, query, src, 2, True, shared, kw)
    rv, _ = torch.topk(full[:, shared], 2, dim=1)
    _close(v, rv)


def _topk(m, query, src, k, largest, idx, kw):
    if "chunk" in kw:   # the engine's streaming block size: several chunks for a small train set
        return fastinf.scoring.top_influences(m, query, src, k, largest, idx, **kw)
    return m.top_influences(query, src, k=k, largest=largest, train_indices=idx, **kw)


# --------------------------------------------------------------------------- kill and resume
SCRIPT = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from torch import nn
    import fastinf
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    g = torch.Generator().manual_seed(1)
    train = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    q = torch.randn(3, 6, generator=g), torch.randint(0, 4, (3,), generator=g)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")
    tr = fastinf.TracIn(model, loss, progress=False)
    if sys.argv[1] == "build":
        fastinf.GradientStore.build(sys.argv[2], tr, train, batch_size=4, shard_size=8,
                                    resume=True, progress=False)
    else:
        s = fastinf.GradientStore.open(sys.argv[2])
        for _ in range(3):
            S = tr.pairwise_scores(q, s)
        torch.save(S, sys.argv[3])
""")


def _run(tmp_path, *args, kill=None, timeout=60):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("FASTINF_STORE_TEST_KILL", None)
    if kill:
        env["FASTINF_STORE_TEST_KILL"] = kill
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


def test_kill_and_resume_identical(tmp_path):
    ref = tmp_path / "ref"
    r = _run(tmp_path, "build", ref)
    assert r.returncode == 0, r.stderr
    st = tmp_path / "st"
    for kill in ("mid:1", "shard:2", "manifest:3"):
        r = _run(tmp_path, "build", st, kill=kill)
        assert r.returncode == -9, (kill, r.returncode, r.stderr)
        if kill.startswith("mid"):
            assert any(".tmp." in p.name for p in st.iterdir())
        with pytest.raises(StoreError):
            GradientStore.open(st)
    r = _run(tmp_path, "build", st)
    assert r.returncode == 0, r.stderr
    assert _files(st) == _files(ref)
    # concurrent readers of a read-only store
    for p in ref.iterdir():
        p.chmod(0o444)
    ref.chmod(0o555)
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, str(tmp_path / "job.py"), "read", str(ref),
                                   str(tmp_path / f"out{i}.pt")], env=env,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        a, b = (torch.load(tmp_path / f"out{i}.pt") for i in range(2))
        assert torch.equal(a, b) and a.shape == (3, 40)
    finally:
        ref.chmod(0o755)


# --------------------------------------------------------------------------- errors
@pytest.fixture
def built(tmp_path):
    model = make_mlp()
    train, query = mlp_data(20, 1), mlp_data(3, 2)
    tr = fastinf.TracIn(model, ce_loss, progress=False)
    GradientStore.build(tmp_path / "s", tr, train, batch_size=4, shard_size=8, progress=False)
    return tmp_path / "s", tr, model, train, query


def test_corrupt_missing_truncated(built):
    path, tr, model, train, query = built
    shard = path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00001.safetensors.*checksum"):
        GradientStore.open(path)
    s = GradientStore.open(path, verify=False)
    with pytest.raises(StoreError, match="shard-00001.safetensors"):
        tr.pairwise_scores(query, s)
    shard.unlink()
    with pytest.raises(StoreError, match="shard-00001.safetensors.*missing"):
        GradientStore.open(path)
    man = path / "manifest.json"
    man.write_text(man.read_text()[:100])
    with pytest.raises(StoreError, match="manifest"):
        GradientStore.open(path)


def test_mismatch_and_existing(built):
    path, tr, model, train, query = built
    s = GradientStore.open(path)
    other = make_mlp(seed=5)
    with pytest.raises(StoreError, match="different model.*weights"):
        fastinf.TracIn(other, ce_loss, progress=False).pairwise_scores(query, s)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    tr2 = fastinf.TracIn(model, ce_loss, checkpoints=[(sd, 0.3)], progress=False)
    with pytest.raises(StoreError, match="checkpoints"):
        tr2.pairwise_scores(query, s)
    trk = fastinf.TracIn(model, ce_loss, projection=fastinf.KroneckerProjection(2, 2),
                         progress=False)
    with pytest.raises(StoreError, match="projection"):
        trk.top_influences(query, s, k=2)
    ek = fastinf.EKFAC(model, ce_loss, progress=False).fit(train, 8)
    with pytest.raises(StoreError, match="kind"):
        ek.pairwise_scores(query, s)
    with pytest.raises(StoreError, match="already exists"):
        GradientStore.build(path, tr, train, batch_size=4, shard_size=8, resume=False,
                            progress=False)
    with pytest.raises(StoreError, match="cannot resume"):
        GradientStore.build(path, tr, train, batch_size=4, shard_size=4, progress=False)
    s2 = GradientStore.build(path, ek, train, batch_size=4, shard_size=8, resume=False,
                             overwrite=True, progress=False)
    _close(ek.pairwise_scores(query, s2), ek.pairwise_scores(query, train))


def test_read_only_directory(built):
    path, tr, model, train, query = built
    direct = tr.pairwise_scores(query, train)
    for p in path.iterdir():
        p.chmod(0o444)
    path.chmod(0o555)
    try:
        s = GradientStore.open(path)
        _close(tr.pairwise_scores(query, s), direct)
        assert s.self_scores().shape == (20,)
    finally:
        path.chmod(0o755)
