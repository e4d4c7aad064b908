"""Per-token ``[Q, N, T]`` and per-module ``{name: [Q, N]}`` scores against a brute-force float64
autograd reference (per-position weights: the gradient of weight copy t is token t's term)."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinf
from fastinf import layers
from _models import TinyTransformer, tf_loss, token_data
from _models import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

torch.set_default_dtype(torch.float32)

L = 7      # sequence length; the model sees T = L - 1 input tokens


class SeqLM(nn.Module):
    """Embedding -> fc -> tanh -> causal mean -> out: both tracked layers see the same tokens."""

    def __init__(self, V=9, d=4, h=5):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.fc = nn.Linear(d, h)
        self.out = nn.Linear(h, V)

    def forward(self, x, w=None):
        """``w``: optional per-position weights ``{name: (W [T, o, i], b [T, o])}``."""
        e = self.emb(x)
        if w is None:
            hid = torch.tanh(self.fc(e))
        else:
            hid = torch.tanh(torch.einsum("toi,bti->bto", w["fc"][0], e) + w["fc"][1])
        c = hid.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=hid.dtype)[:, None]
        if w is None:
            return self.out(c)
        return torch.einsum("toi,bti->bto", w["out"][0], c) + w["out"][1]


def _loss(model, batch, w=None):
    x, m = batch
    logits = model(x[:, :-1], w)
    ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    return (ce * m[:, 1:]).sum(1)


def lm_loss(model, batch):
    return _loss(model, batch)


def lm_mask(batch):
    """Token t counts iff its target is real; token 1 is masked where it is even (a hole that
    depends on the example, not on its place in a batch)."""
    keep = batch[1][:, 1:].bool().clone()
    keep[:, 1] &= batch[0][:, 1] % 2 == 1
    return keep


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 9, (n, L), generator=g)
    lens = torch.randint(3, L + 1, (n,), generator=g)
    m = torch.arange(L)[None] < lens[:, None]
    return torch.where(m, x, 0), m.double()


def brute_token_grads(model, data):
    """``{name: D [N, T, out, in+1]}`` per-token gradients (masked tokens zeroed), float64."""
    T = L - 1
    out = {"fc": [], "out": []}
    keep = lm_mask(data)
    for i in range(data[0].shape[0]):
        w = {}
        for name in out:
            mod = getattr(model, name)
            w[name] = (mod.weight.detach().expand(T, -1, -1).clone().requires_grad_(),
                       mod.bias.detach().expand(T, -1).clone().requires_grad_())
        loss = _loss(model, tuple(t[i:i + 1] for t in data), w).sum()
        flat = [p for name in out for p in w[name]]
        gs = torch.autograd.grad(loss, flat)
        for k, name in enumerate(out):
            D = torch.cat([gs[2 * k], gs[2 * k + 1][..., None]], -1)
            out[name].append(D * keep[i, :, None, None])
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.manual_seed(0)
    model = SeqLM().double()
    train, query = _data(9, 1), _data(4, 2)
    ek = fastinf.EKFAC(model, lm_loss, token_mask_fn=lm_mask, progress=False).fit(train, batch_size=4)
    tr = fastinf.TracIn(model, lm_loss, token_mask_fn=lm_mask, progress=False)
    Dn = brute_token_grads(model, train)
    Dq = {k: v.sum(1) for k, v in brute_token_grads(model, query).items()}
    ref = {}
    for kind, m in (("ekfac", ek), ("tracin", tr)):
        ref[kind] = {n: torch.einsum("qoi,ntoi->qnt",
                                     ek.precondition(n, Dq[n]) if kind == "ekfac" else Dq[n], Dn[n])
                     for n in Dn}
    root = tmp_path_factory.mktemp("stores")
    stores = {k: fastinf.GradientStore.build(root / k, m, train, batch_size=4, shard_size=5,
                                             layout="factors", progress=False)
              for k, m in (("ekfac", ek), ("tracin", tr))}
    return {"ekfac": ek, "tracin": tr}, stores, train, query, ref


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert float((a.double() - b.double()).abs().max()) <= tol * float(b.double().abs().max())


@pytest.mark.parametrize("kind", ["ekfac", "tracin"])
@pytest.mark.parametrize("source", ["data", "store"])
def test_per_token_and_per_module_against_brute_force(case, kind, source):
    ms, stores, train, query, ref = case
    m = ms[kind]
    src = train if source == "data" else stores[kind]
    total = ref[kind]["fc"] + ref[kind]["out"]
    tok = m.pairwise_scores(query, src, batch_size=3, per_token=True, query_batch_size=3)
    assert tok.dtype == torch.float32 and tok.shape == (4, 9, L - 1)
    _close(tok, total)
    assert torch.count_nonzero(tok[:, ~lm_mask(train)]) == 0          # masked tokens are 0
    pw = m.pairwise_scores(query, src, batch_size=3)
    _close(tok.sum(2), pw)
    mod = m.pairwise_scores(query, src, batch_size=3, per_module=True)
    assert list(mod) == ["fc", "out"]
    for n in mod:
        _close(mod[n], ref[kind][n].sum(2))
    _close(mod["fc"] + mod["out"], pw)
    both = m.pairwise_scores(query, src, batch_size=3, per_module=True, per_token=True)
    for n in both:
        _close(both[n], ref[kind][n])


def test_low_rank_per_token_sums_to_low_rank_pairwise(case):
    ms, _, train, query, _ = case
    ek = ms["ekfac"]
    tok = ek.pairwise_scores(query, train, batch_size=3, query_rank=1, per_token=True)
    _close(tok.sum(2), ek.pairwise_scores(query, train, batch_size=3, query_rank=1))


@pytest.mark.parametrize("use_dense", [True, False])
def test_score_tokens_both_query_forms_float64(use_dense):
    """The torch per-token contraction against the einsum formula, for factor queries scored
    through their dense form and directly."""
    g = torch.Generator().manual_seed(3)
    A, G = torch.randn(5, 6, 4, generator=g, dtype=torch.float64), torch.randn(5, 6, 3, generator=g,
                                                                              dtype=torch.float64)
    mask = torch.rand(5, 6, generator=g) > 0.3
    V, U = torch.randn(2, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, generator=g,
                                                                              dtype=torch.float64)
    vmask = torch.rand(2, 4, generator=g) > 0.3
    q = layers.Query(layers.LayerBatch(V, U, vmask))
    q.use_dense = use_dense
    got = layers.score(layers.LayerBatch(A, G, mask), q, torch.float64, per_token=True)
    Dq = torch.einsum("qso,qsi->qoi", U * vmask[..., None], V)
    ref = torch.einsum("qoi,nto,nti->nqt", Dq, G, A) * mask[:, None]
    assert got.dtype == torch.float64
    _close(got, ref, 1e-12)
    qd = layers.Query(layers.DenseLayer(Dq))
    _close(layers.score(layers.LayerBatch(A, G, mask), qd, torch.float64, per_token=True), ref, 1e-12)


def test_errors(case, tmp_path):
    ms, _, train, query, _ = case
    ek = ms["ekfac"]
    dense = fastinf.GradientStore.build(tmp_path / "d", ek, train, batch_size=4, layout="dense",
                                        progress=False)
    with pytest.raises(ValueError, match="layout 'dense'.*\\['fc', 'out'\\]|\\['fc', 'out'\\].*layout 'dense'"):
        ek.pairwise_scores(query, dense, per_token=True)
    ek.pairwise_scores(query, dense, per_module=True)       # dense records hold modules
    with pytest.raises(TypeError, match="per_token must be True or False"):
        ek.pairwise_scores(query, train, per_token=1)
    for proj in (fastinf.KroneckerProjection(2, 2), fastinf.RandomProjection(8)):
        tr = fastinf.TracIn(ek.model, lm_loss, token_mask_fn=lm_mask, progress=False,
                            projection=proj)
        st = fastinf.GradientStore.build(tmp_path / type(proj).__name__, tr, train, batch_size=4,
                                         progress=False)
        for src in (train, st):
            for kw in ({"per_token": True}, {"per_module": True}):
                with pytest.raises(ValueError, match=f"{next(iter(kw))}=True is not available "
                                                     "with a projection"):
                    tr.pairwise_scores(query, src, **kw)
    # a store written before token positions were kept
    enc = layers.encode("c0", {"fc": layers.LayerBatch(torch.ones(2, 3, 4), torch.ones(2, 3, 5))},
                        {"fc": "factors"}, torch.float32)
    del enc["c0/fc/positions"], enc["c0/fc/lengths"]
    with pytest.raises(ValueError, match="token positions of layer 'fc'.*rebuild"):
        layers.decode(enc, "c0", ["fc"], {"fc": "factors"}, "cpu", tokens=True)
    # layers seeing different token counts (a pooled head): named, with the way out
    model = TinyTransformer()
    g = torch.Generator().manual_seed(0)
    data = token_data(g, 6)
    tr = fastinf.TracIn(model, tf_loss, token_mask_fn=lambda b: b[1], progress=False)
    with pytest.raises(ValueError, match="'ff' sees 7.*'head' sees 1.*modules="):
        tr.pairwise_scores(data, data, per_token=True)
    tr = fastinf.TracIn(model, tf_loss, token_mask_fn=lambda b: b[1], progress=False,
                        modules=["qkv", "proj", "ff"])
    tok = tr.pairwise_scores(data, data, per_token=True)
    assert tok.shape == (6, 6, 7) and torch.count_nonzero(tok[:, ~data[1]]) == 0
    _close(tok.sum(2), tr.pairwise_scores(data, data))


def test_documented_example():
    """The per-token / per-module example of docs/ekfac.md runs as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "ekfac.md").read_text()
    section = text.split("## Per-token and per-module scores", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    ns = {}
    exec(compile(code, "docs/ekfac.md[per-token example]", "exec"), ns)
    assert ns["tok"].shape == (2, 16, 5)
    _close(ns["tok"].sum(2), ns["scores"])
    _close(sum(ns["by_module"].values()), ns["scores"])
