"""Block replay (fastinf.replay): pairwise scores by groups of layers, the later passes replaying
only the blocks that hold a group, equal the scores of full passes (float64), and every case
replay cannot reproduce falls back to full passes with a warning naming why."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinf
import fastinf.replay as R
import fastinf.scoring as scoring
from _models import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)


class Block(nn.Module):
    def __init__(self, d, mlp):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x, key_mask, scale=1.0):
        h = self.ln(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1]) * scale
        att = att.masked_fill(~key_mask[:, None, :], -1e9).softmax(-1)
        x = x + self.o(att @ v)
        return x + self.fc2(torch.tanh(self.fc1(x)))


class BlockLM(nn.Module):
    """Embedding, a ModuleList of blocks, a per-token head (an LM)."""

    def __init__(self, vocab=13, d=16, mlp=32, n_blocks=3, kwarg=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, mlp) for _ in range(n_blocks))
        self.head = nn.Linear(d, vocab)
        self.kwarg = kwarg          # an extra keyword argument passed to every block

    def forward(self, tok, mask):
        x = self.emb(tok)
        for b in self.blocks:
            x = b(x, mask, **({} if self.kwarg is None else {"scale": self.kwarg}))
        return self.head(x)


def lm_loss(model, batch):
    tok, mask = batch
    logits = model(tok, mask)
    labels = tok[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                           reduction="none").sum(1)


def data(g, n, L=7, vocab=13):
    tok = torch.randint(1, vocab, (n, L), generator=g)
    lens = torch.randint(2, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None] < lens[:, None]
    return torch.where(mask, tok, 0), mask


def _mask(batch):
    return batch[1]


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _setup(model=None, n=20, nq=9, seed=0):
    torch.manual_seed(seed)
    model = model or BlockLM()
    g = torch.Generator().manual_seed(seed)
    train, query = data(g, n), data(g, nq)
    ek = fastinf.EKFAC(model, lm_loss, token_mask_fn=_mask, progress=False).fit(train, batch_size=8)
    return ek, train, query


def _groups_budget(method, query, n_train, monkeypatch, frac=0.4):
    """A query budget that splits the layers into several groups: the block records of the
    queries and the train set (they count against it) plus ``frac`` of the rest of the query
    state."""
    st = scoring.query_state(method, query, 4)
    total = sum(scoring._record_bytes(q.rec) for s in st for q in s.values())
    m = method.model
    records = 2 * len(m.blocks) * query[0].shape[1] * m.emb.embedding_dim * 8 * \
        (len(query[0]) + n_train) * len(st)
    assert total > records
    monkeypatch.setenv("FASTINF_QUERY_MEMORY_MB", str((records + frac * (total - records)) / 2**20))


class _Count:
    """Counts batches captured by replay and full-pass recordings."""

    def __init__(self, monkeypatch):
        self.replayed, self.disabled = 0, []
        real_capture, real_disable = R.BlockReplay.capture, R.BlockReplay.disable

        def capture(rp, *a, **k):
            out = real_capture(rp, *a, **k)
            self.replayed += out is not None
            return out

        def disable(rp, reason):
            self.disabled.append(reason)
            real_disable(rp, reason)
        monkeypatch.setattr(R.BlockReplay, "capture", capture)
        monkeypatch.setattr(R.BlockReplay, "disable", disable)


def _reference(ek, query, train, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setenv("FASTINF_REPLAY_MEMORY_MB", "0")
        return ek.pairwise_scores(query, train, batch_size=4, **kw)


def _close(a, b, tol=1e-6):     # scores come back in float32
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * float(b.abs().max()), float((a - b).abs().max())


def test_find_blocks():
    model = BlockLM(n_blocks=3)
    mods = fastinf.EKFAC(model, lm_loss, progress=False).modules
    found = R.find_blocks(model, mods)
    assert [n for n, _, _ in found] == ["blocks.0", "blocks.1", "blocks.2"]
    assert found[1][2] == [f"blocks.1.{x}" for x in ("q", "k", "v", "o", "fc1", "fc2")]
    # one block only, or a plain Sequential of layers: no stack of blocks
    assert R.find_blocks(BlockLM(n_blocks=1), fastinf.EKFAC(BlockLM(n_blocks=1), lm_loss,
                                                             progress=False).modules) == []
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert R.find_blocks(seq, {"0": seq[0], "2": seq[2]}) == []


def test_replay_equals_full_passes(f64, monkeypatch):
    ek, train, query = _setup()
    ref = _reference(ek, query, train, monkeypatch)
    ref_mod = _reference(ek, query, train, monkeypatch, per_module=True)
    _groups_budget(ek, query, len(train[0]), monkeypatch)
    c = _Count(monkeypatch)
    groups = []
    real_qb = scoring.query_batches

    def spy_qb(*a, **k):
        for q0, st in real_qb(*a, **k):
            groups.append(list(st[0]))
            yield q0, st
    monkeypatch.setattr(scoring, "query_batches", spy_qb)
    trims = []
    real_trim = scoring.release_heap
    monkeypatch.setattr(scoring, "release_heap", lambda: trims.append(1) or real_trim())
    got = ek.pairwise_scores(query, train, batch_size=4)
    _close(got, ref)
    assert len(groups) > 2 and c.disabled == []
    # the C heap is trimmed twice per group: before its query pass (the last train pass's
    # tiles) and when its query state is assembled (the query pass's transients, before the
    # train pass)
    assert len(trims) == 2 * len(groups)
    # every group after the first is replayed: 3 query batches + 5 train batches each
    assert c.replayed == (len(groups) - 1) * (3 + 5)
    # every layer in one group; the head (outside the blocks) in the first, which the full
    # recording pass captures; every later group inside one block (one block replay each)
    assert "head" in groups[0]
    assert sorted(p for g in groups for p in g) == sorted(ek.modules)
    for g in groups[1:]:
        assert len({p.split(".")[1] for p in g}) == 1, g
    got = ek.pairwise_scores(query, train, batch_size=4, per_module=True)
    assert list(got) == list(ref_mod)
    for k in got:
        _close(got[k], ref_mod[k])


def test_groups_by_block_never_span_blocks():
    """The d=256 Llama's layers (MiB of query state) under a 300 MiB cap: consecutive packing
    spanned two blocks in 3 of 13 groups (15 block replays); per-block packing replays 11."""
    sizes, block_of = {"lm_head": 96}, {}
    for b in range(4):
        for n, mib in [("q", 64), ("k", 64), ("v", 64), ("o", 64), ("gate", 172), ("up", 172),
                       ("down", 172)]:
            sizes[f"{b}.{n}"] = mib
            block_of[f"{b}.{n}"] = b
    groups = scoring._groups_by_block(sizes, 300, block_of)
    assert sorted(p for g in groups for p in g) == sorted(sizes)
    assert all(sum(sizes[p] for p in g) <= 300 for g in groups)
    assert groups[0][0] == "lm_head"
    assert sum(len({block_of[p] for p in g}) for g in groups[1:]) == 11
    assert len(groups) == 12
    # no layer outside the blocks: the first group is the largest that fits, in layer order
    del sizes["lm_head"]
    groups = scoring._groups_by_block(sizes, 300, block_of)
    assert groups[0] == ["0.q", "0.k", "0.gate"] and len(groups) == 12
    # a layer above the cap has a group of its own
    groups = scoring._groups_by_block({"a": 500, "b": 10}, 300, {"a": 0, "b": 0})
    assert sorted(groups) == [["a"], ["b"]]


class _Rec:
    """A stand-in for a BlockReplay in the planning: ``per_block`` bytes of records per block."""

    def __init__(self, per_block, block_of):
        self.per_block, self.block_of, self.budget = per_block, block_of, 10**9

    def block_bytes(self, blocks):
        return self.per_block * len(blocks)


def test_replay_groups_recount_the_blocks_later_groups_replay():
    """The d=256 Llama's rank-32 queries (MiB of query state for 256 queries: four blocks of
    152.5, a 20 MiB head; 24.75 MiB of records per block and dataset, both datasets of 256):
    with every block's records counted the cap is 318.5 MiB and the first group holds the head
    and one block (3 replays per dataset); the records of that block are not needed, the cap
    grows to 367 and the first group takes two blocks; recounted again (415 MiB) it holds
    the same, so blocks 2 and 3 are recorded and replayed: 2 replays per dataset."""
    mib, Q = 2**20, 256
    sizes, block_of = {"lm_head": 20 * mib // Q}, {}
    for b in range(4):
        for n, m in [("q", 16), ("k", 16), ("v", 16), ("o", 16), ("gate", 29.5), ("up", 29.5),
                     ("down", 29.5)]:
            sizes[f"{b}.{n}"] = int(m * mib) // Q
            block_of[f"{b}.{n}"] = b
    recs = [_Rec(int(24.2 * mib), block_of)]       # per dataset (Q = train size = first)
    groups, blocks = scoring._replay_groups(sizes, 512 * mib, Q, Q, Q, recs)
    assert blocks == {2, 3}
    assert sorted(groups[0]) == sorted(["lm_head"] + [p for p in sizes if block_of.get(p) in (0, 1)])
    assert [sorted({block_of[p] for p in g}) for g in groups[1:]] == [[2], [3]]
    # every block's records counted, the plan of before: the head and block 0 first
    g_all = scoring._groups_by_block(sizes, (512 * mib - 8 * recs[0].per_block) // Q, block_of)
    assert len(g_all) == 4 and {block_of[p] for p in g_all[0] if p in block_of} == {0}
    # even the largest layer does not fit beside the records: no plan
    assert scoring._replay_groups(sizes, 200 * mib, Q, Q, Q, recs) is None


def test_blocks_inside_the_first_group_are_not_recorded(f64, monkeypatch):
    """A budget under which the first group takes whole blocks once their records are not
    counted: only the block the later group replays is recorded, on both datasets, and the
    scores equal full passes'. (Dense queries: the plan is sized from their bytes.)"""
    ek, train, query = _setup()
    ek.compact_queries = False
    ref = _reference(ek, query, train, monkeypatch)
    st = scoring.query_state(ek, query, 4)
    size = {p: scoring._record_bytes(q.rec) for s in st for p, q in s.items()}
    block = sum(v for p, v in size.items() if p.startswith("blocks.0."))
    head, total = size["head"], sum(size.values())
    nq, nt = len(query[0]), len(train[0])
    per_block = 2 * 7 * 16 * 8 * (nq + nt)        # block input and output gradient, f64
    # all 3 blocks' records counted: the head and one block fit, two do not; blocks 1 and 2
    # counted: the head and two blocks fit; everything does not fit beside one block's records
    lo = max(3 * per_block + head + block, 2 * per_block + head + 2 * block)
    hi = min(3 * per_block + head + 2 * block, per_block + total)
    assert lo < hi
    monkeypatch.setenv("FASTINF_QUERY_MEMORY_MB", str((lo + hi) / 2 / 2**20))
    kept = []
    real = R.BlockReplay.__init__

    def init(rp, *a, **k):
        real(rp, *a, **k)
        kept.append(rp)
    monkeypatch.setattr(R.BlockReplay, "__init__", init)
    c = _Count(monkeypatch)
    _close(ek.pairwise_scores(query, train, batch_size=4), ref)
    assert c.disabled == [] and c.replayed > 0
    assert [rp.what for rp in kept] == ["query", "train"]
    assert all(rp.kept == {2} for rp in kept)
    assert all(set(rec.args) == set(rec.gouts) == {2} for rp in kept for rec in rp.records.values())


def test_partial_budget_records_some_batches(f64, monkeypatch):
    ek, train, query = _setup()
    ref = _reference(ek, query, train, monkeypatch)
    _groups_budget(ek, query, len(train[0]), monkeypatch)
    per_batch = 2 * 3 * 4 * 7 * 16 * 8         # 2 tensors x 3 blocks x 4 examples x L x d x 8 B
    monkeypatch.setenv("FASTINF_REPLAY_MEMORY_MB", str(2.5 * per_batch / 2**20))
    c = _Count(monkeypatch)
    _close(ek.pairwise_scores(query, train, batch_size=4), ref)
    assert c.disabled == [] and c.replayed > 0


def test_tracin_terms_replay(f64, monkeypatch):
    torch.manual_seed(1)
    model = BlockLM()
    g = torch.Generator().manual_seed(1)
    train, query = data(g, 12), data(g, 6)
    other = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    tr = fastinf.TracIn(model, lm_loss, token_mask_fn=_mask, progress=False,
                        checkpoints=[(model.state_dict(), 0.5), (other, 2.0)])
    ref = _reference(tr, query, train, monkeypatch)
    _groups_budget(tr, query, len(train[0]), monkeypatch)
    c = _Count(monkeypatch)
    _close(tr.pairwise_scores(query, train, batch_size=4), ref)
    assert c.replayed > 0 and c.disabled == []


class StatefulLM(BlockLM):
    """Blocks read a scale the parent sets per batch outside their arguments."""

    def forward(self, tok, mask):
        for b in self.blocks:
            b.extra = float(tok[0, 0])
        x = self.emb(tok)
        for b in self.blocks:
            x = b(x, mask, scale=1.0) * (1 + 0.01 * b.extra)
        return self.head(x)


class StateBlock(Block):
    def forward(self, x, key_mask, scale=1.0):
        return super().forward(x, key_mask, scale=1.0 + 0.1 * self.extra)


class _Thing:
    pass


class DynamicCache:
    """A key/value cache as transformers': replayed as None; a non-empty one read by the block
    changes its outputs, so the replay check refuses it."""

    def __init__(self, bias=0.0):
        self.bias = bias


@pytest.mark.parametrize("case", ["state", "object", "cache", "outside", "twice"])
def test_unreplayable_falls_back_with_warning(f64, monkeypatch, caplog, case):
    torch.manual_seed(0)
    if case == "state":
        model = StatefulLM()
        for i, b in enumerate(model.blocks):
            sb = StateBlock(16, 32)
            sb.load_state_dict(b.state_dict())
            model.blocks[i] = sb
    elif case == "object":
        model = BlockLM(kwarg=_Thing())
        for blk in model.blocks:   # accept the object, ignore it
            blk.forward = (lambda b: lambda x, key_mask, scale=None: Block.forward(b, x, key_mask))(blk)
    elif case == "cache":       # a non-empty cache read by the blocks
        model = BlockLM(kwarg=DynamicCache(0.5))
        for blk in model.blocks:
            blk.forward = (lambda b: lambda x, key_mask, scale=None: Block.forward(b, x, key_mask)
                           + (0 if scale is None else scale.bias))(blk)
    elif case == "outside":
        model = BlockLM()
        shared = model.blocks[0].fc2

        class Outside(BlockLM):
            def forward(self, tok, mask):
                return super().forward(tok, mask) + 0 * shared(torch.tanh(
                    self.blocks[0].fc1(self.emb(tok)))).sum(-1, keepdim=True)
        m2 = Outside()
        m2.load_state_dict(model.state_dict())
        model = m2
    else:
        model = BlockLM(n_blocks=2)
        model.blocks.append(model.blocks[0])      # the same block called twice
    ek, train, query = _setup(model)
    ref = _reference(ek, query, train, monkeypatch)
    _groups_budget(ek, query, len(train[0]), monkeypatch)
    c = _Count(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fastinf"):
        got = ek.pairwise_scores(query, train, batch_size=4)
    _close(got, ref)
    why = {"state": "did not reproduce", "object": "_Thing", "outside": "outside its block",
           "twice": "called 2 times", "cache": "did not reproduce"}[case]
    assert c.disabled and why in c.disabled[0], c.disabled
    assert any("block replay is off" in r.getMessage() and why in r.getMessage()
               for r in caplog.records)


def test_budget_zero_turns_replay_off(monkeypatch):
    model = BlockLM()
    monkeypatch.setenv("FASTINF_REPLAY_MEMORY_MB", "0")
    rp = R.BlockReplay(model, fastinf.EKFAC(model, lm_loss, progress=False).modules)
    assert not rp.active and rp.recorder(0) is None


def test_empty_cache_replayed_as_none(f64, monkeypatch):
    """A cache object the blocks receive but do not read (an empty transformers cache) is left
    out of the records, and the replay reproduces the blocks."""
    model = BlockLM(kwarg=DynamicCache())
    for blk in model.blocks:
        blk.forward = (lambda b: lambda x, key_mask, scale=None: Block.forward(b, x, key_mask))(blk)
    ek, train, query = _setup(model)
    ref = _reference(ek, query, train, monkeypatch)
    _groups_budget(ek, query, len(train[0]), monkeypatch)
    c = _Count(monkeypatch)
    _close(ek.pairwise_scores(query, train, batch_size=4), ref)
    assert c.replayed > 0 and c.disabled == []
