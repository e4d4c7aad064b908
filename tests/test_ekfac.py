"""EK-FAC end to end against a brute-force float64 EK-FAC written from the formulas."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import fastinf
from fastinf.ekfac import _held_bytes, _kept_rows
from fastinf.capture import NonFiniteError

torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------- models / data
class TinyLM(nn.Module):
    """Embedding -> Linear -> tanh -> causal mean over tokens -> Linear to the vocabulary."""

    def __init__(self, V=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.fc = nn.Linear(d, 7)
        self.out = nn.Linear(7, V)

    def forward(self, x):  # [B, T]
        h = torch.tanh(self.fc(self.emb(x)))
        csum = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.out(csum)


def lm_loss(model, batch):
    x, m = batch
    logits = model(x[:, :-1])
    ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    return (ce * m[:, 1:]).sum(1)


def lm_mask(batch):
    # input token t counts iff its target t+1 is a real token
    return batch[1][:, 1:].bool()


def cls_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def make_case(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        X = torch.randn(24, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (24,), generator=g)
        return model, cls_loss, None, (X, y)
    if kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                              nn.Linear(3 * 3 * 3, 4)).double()
        X = torch.randn(16, 2, 5, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (16,), generator=g)
        return model, cls_loss, None, (X, y)
    model = TinyLM().double()
    x = torch.randint(0, 11, (14, 7), generator=g)
    lens = torch.randint(2, 8, (14,), generator=g)
    m = torch.arange(7)[None, :] < lens[:, None]
    x = torch.where(m, x, 0)
    return model, lm_loss, lm_mask, (x, m.double())


# ----------------------------------------------------------------------------- brute force
def brute_tokens(model, loss_fn, mask_fn, data, names):
    """Per-layer lists of unmasked (a_t, g_t) per example via hooks + retain_grad (own unfold)."""
    mods = dict(model.named_modules())
    acts, outs = {}, {}

    def hook(name):
        def f(mod, args, out):
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                a = F.unfold(x, mod.kernel_size, padding=mod.padding, stride=mod.stride).transpose(1, 2)
            else:
                a = x.reshape(x.shape[0], -1, x.shape[-1])
            acts[name] = torch.cat([a, torch.ones_like(a[..., :1])], -1).detach()
            out.retain_grad()
            outs[name] = out
        return f

    hs = [mods[n].register_forward_hook(hook(n)) for n in names]
    loss_fn(model, data).sum().backward()
    for h in hs:
        h.remove()
    model.zero_grad()
    res = {}
    for n in names:
        go = outs[n].grad
        if isinstance(mods[n], nn.Conv2d):
            go = go.flatten(2).transpose(1, 2)
        else:
            go = go.reshape(go.shape[0], -1, go.shape[-1])
        a = acts[n]
        keep = torch.ones(a.shape[:2], dtype=torch.bool)
        if mask_fn is not None and mask_fn(data).shape == a.shape[:2]:
            keep = mask_fn(data).bool()
        res[n] = (a, go, keep)
    return res


def per_example_grads(model, loss_fn, data, names):
    """``{name: D [N, dout, din]}`` via torch.func (bias as last column)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, *ex):
        batch = tuple(e[None] for e in ex)
        return functional_call(model, p, (batch[0],)) if False else loss_fn(
            _Bound(model, p), batch).sum()

    gs = vmap(grad(one), in_dims=(None,) + (0,) * len(data))(params, *data)
    out = {}
    for n in names:
        w = gs[f"{n}.weight"]
        out[n] = torch.cat([w.reshape(w.shape[0], w.shape[1], -1), gs[f"{n}.bias"][..., None]], -1)
    return out


class _Bound:
    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, *args):
        return functional_call(self.model, self.params, args)


def brute_ekfac(model, loss_fn, mask_fn, train, names, damping=None):
    tok = brute_tokens(model, loss_fn, mask_fn, train, names)
    D = per_example_grads(model, loss_fn, train, names)
    N = train[0].shape[0]
    fac = {}
    for n in names:
        a, g, keep = tok[n]
        af, gf = a[keep], g[keep]
        A = af.T @ af / af.shape[0]
        S = gf.T @ gf / gf.shape[0]
        _, QA = torch.linalg.eigh(A)
        _, QS = torch.linalg.eigh(S)
        lam = ((QS.T @ D[n] @ QA) ** 2).mean(0)
        lam_d = 0.1 * lam.mean() if damping is None else damping
        fac[n] = dict(A=A, S=S, QA=QA, QS=QS, lam=lam, damping=lam_d)
    return fac, D


def brute_scores(fac, Dq, Dn, names):
    S = 0
    for n in names:
        f = fac[n]
        R = f["QS"].T @ Dq[n] @ f["QA"] / (f["lam"] + f["damping"])
        M = f["QS"] @ R @ f["QA"].T
        S = S + torch.einsum("qoi,noi->qn", M, Dn[n])
    return S


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lm"])
def test_against_brute_force(kind):
    model, loss_fn, mask_fn, train = make_case(kind)
    ek = fastinf.EKFAC(model, loss_fn, token_mask_fn=mask_fn, progress=False).fit(train, batch_size=5)
    names = list(ek.modules)
    fac, D = brute_ekfac(model, loss_fn, mask_fn, train, names)
    for n in names:
        L = ek.factors[n]
        A = L["QA"] @ torch.diag(L["eigA"]) @ L["QA"].T
        S = L["QS"] @ torch.diag(L["eigS"]) @ L["QS"].T
        assert rel(A, fac[n]["A"]) < 1e-6
        assert rel(S, fac[n]["S"]) < 1e-6
        # Λ is basis-dependent only up to eigenvector signs (squared): compare directly
        assert rel(L["lam"], fac[n]["lam"]) < 1e-6, n
        assert abs(L["damping"] - float(fac[n]["damping"])) < 1e-6 * abs(float(fac[n]["damping"]))
    q = tuple(t[:4] for t in train)
    ref = brute_scores(fac, {n: D[n][:4] for n in names}, D, names)
    got = ek.pairwise_scores(q, train, batch_size=6)
    assert got.dtype == torch.float32 and got.shape == (4, train[0].shape[0])
    assert rel(got, ref) < 1e-6
    self_ref = torch.stack([brute_scores(fac, {n: D[n][i:i + 1] for n in names},
                                         {n: D[n][i:i + 1] for n in names}, names)[0, 0]
                            for i in range(train[0].shape[0])])
    assert rel(ek.self_scores(train, batch_size=7), self_ref) < 1e-6


@pytest.fixture(scope="module")
def fitted():
    model, loss_fn, mask_fn, train = make_case("lm")
    ek = fastinf.EKFAC(model, loss_fn, token_mask_fn=mask_fn, progress=False).fit(train, batch_size=4)
    return ek, model, loss_fn, mask_fn, train


def test_invariances(fitted, tmp_path):
    ek, model, loss_fn, mask_fn, train = fitted
    q = tuple(t[:3] for t in train)
    S = ek.pairwise_scores(q, train, batch_size=4)
    # batch size
    ek2 = fastinf.EKFAC(model, loss_fn, token_mask_fn=mask_fn, progress=False).fit(train, batch_size=9)
    assert rel(ek2.pairwise_scores(q, train, batch_size=5), S) < 1e-6
    # data order: permuted train -> permuted columns (fit on permuted data too)
    perm = torch.randperm(train[0].shape[0])
    tp = tuple(t[perm] for t in train)
    ek3 = fastinf.EKFAC(model, loss_fn, token_mask_fn=mask_fn, progress=False).fit(tp, batch_size=4)
    assert rel(ek3.pairwise_scores(q, tp, batch_size=4), S[:, perm]) < 1e-6
    # padding: extra padded columns change nothing
    x, m = train
    xp = torch.cat([x, torch.zeros(x.shape[0], 3, dtype=x.dtype)], 1)
    mp = torch.cat([m, torch.zeros(m.shape[0], 3, dtype=m.dtype)], 1)
    ek4 = fastinf.EKFAC(model, loss_fn, token_mask_fn=mask_fn, progress=False).fit((xp, mp), batch_size=4)
    qp = (xp[:3], mp[:3])
    assert rel(ek4.pairwise_scores(qp, (xp, mp), batch_size=4), S) < 1e-6
    # self == diag(pairwise(train, train))
    full = ek.pairwise_scores(train, train, batch_size=4)
    assert rel(ek.self_scores(train, batch_size=3), full.diagonal()) < 1e-6
    # save -> load -> same scores
    p = tmp_path / "f.pt"
    ek.save(p)
    ek5 = fastinf.EKFAC.load(p, model, loss_fn, token_mask_fn=mask_fn, progress=False)
    assert torch.equal(ek5.pairwise_scores(q, train, batch_size=4), S)


@pytest.mark.parametrize("kind", ["cnn", "lm"])
def test_kept_tokens_give_the_factors_of_two_passes(kind):
    """fit keeps the covariance pass's tokens for the eigenvalue correction while they fit in
    token_memory and recomputes only the other batches: the same factors, bit for bit, with
    one pass (all kept), 1 + 2/3 (one batch of three kept) or two (none kept)."""
    model, loss_fn, mask_fn, train = make_case(kind)
    seen = []

    def counted(m, b):
        seen.append(b[0].shape[0])
        return loss_fn(m, b)
    n = train[0].shape[0]
    bs = -(-n // 3)
    fits = []
    for memory in (0, None, 1):
        seen.clear()
        ek = fastinf.EKFAC(model, counted, token_mask_fn=mask_fn, progress=False)
        if memory == 1:   # room for the first batch only
            probe = fastinf.EKFAC(model, loss_fn, token_mask_fn=mask_fn, progress=False)
            first = next(probe._pass(train, bs, loss_fn, "", "loss_fn", "train"))[1]
            memory = _held_bytes(_kept_rows(first))  # what fit keeps: padding dropped
        ek.fit(train, batch_size=bs, token_memory=memory)
        fits.append((ek, sum(seen)))
    (ref, two), (one_pass, one), (part, some) = fits
    assert (two, one, some) == (2 * n, n, n + n - bs)
    for ek in (one_pass, part):
        assert ek.n_fit == ref.n_fit == n
        for name, L in ref.factors.items():
            for k in ("QA", "QS", "lam", "eigA", "eigS"):
                assert torch.equal(ek.factors[name][k], L[k]), (name, k)
            assert ek.factors[name]["damping"] == L["damping"]
    with pytest.raises(ValueError, match="token_memory"):
        fastinf.EKFAC(model, loss_fn, progress=False).fit(train, token_memory=-1)


def test_layers_sharing_an_input_share_its_eigendecomposition(monkeypatch):
    """Two projections of the same input (an attention's q and k) have equal input covariances:
    one eigendecomposition serves both, with the factors of separate ones."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(5, 4), nn.Linear(5, 3)

        def forward(self, x):
            return torch.cat([torch.tanh(self.q(x)), self.k(x)], 1)
    torch.manual_seed(0)
    model = TwoHeads().double()
    X = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randint(0, 7, (20,))
    calls, grams = [], []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda C, **kw: calls.append(C.shape) or real(C, **kw))
    import fastinf.ekfac as E
    real_gram = E._add_gram
    monkeypatch.setattr(E, "_add_gram", lambda C, X: grams.append(X.shape[1]) or real_gram(C, X))
    ek = fastinf.EKFAC(model, cls_loss, progress=False).fit((X, y), batch_size=6)
    assert sorted(calls) == [(3, 3), (4, 4), (6, 6)]
    # per batch (4 of them) one gram of the shared input (5 + bias column), one per output side
    assert sorted(grams) == [3] * 4 + [4] * 4 + [6] * 4
    fac, _ = brute_ekfac(model, cls_loss, None, (X, y), ["q", "k"])
    for n in ("q", "k"):
        L = ek.factors[n]
        assert rel(L["QA"] @ torch.diag(L["eigA"]) @ L["QA"].T, fac[n]["A"]) < 1e-6
        assert rel(ek.factors[n]["lam"], fac[n]["lam"]) < 1e-6
    assert torch.equal(ek.factors["q"]["QA"], ek.factors["k"]["QA"])
    assert ek.factors["q"]["QA"] is not ek.factors["k"]["QA"]


def test_fit_ignores_what_masked_tokens_hold():
    """The fit's pass leaves masked tokens unzeroed (zero_masked=False) and drops them itself:
    padding that holds large values gives the factors of padding that holds zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()  # per token
    X = torch.randn(10, 7, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (10, 7))
    m = torch.rand(10, 7) > 0.3
    m[:, 0] = True

    def loss_fn(model, b):
        out = F.cross_entropy(model(b[0]).flatten(0, 1), b[1].flatten(), reduction="none")
        return (out.view(b[1].shape) * b[2]).sum(1)
    mask_fn = lambda b: b[2]  # noqa: E731
    fits = []
    for fill in (0.0, 1e3):
        Xf = X.masked_fill(~m[..., None], fill)
        fits.append(fastinf.EKFAC(model, loss_fn, token_mask_fn=mask_fn, progress=False)
                    .fit((Xf, y, m), batch_size=4))
    for name, L in fits[0].factors.items():
        for k in ("QA", "QS", "lam", "eigA", "eigS"):
            assert rel(fits[1].factors[name][k].abs(), L[k].abs()) < 1e-9, (name, k)


def test_fit_keeps_only_unmasked_rows_shared_once():
    """The fit sums and keeps the kept tokens only (padding dropped), one copy of an input that
    several layers read, with the offsets the ekfac_lambda op takes; unmasked batches are views."""
    from fastinf.layers import LayerBatch
    A = torch.randn(3, 4, 6)
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    A.masked_fill_(~m[..., None], 0)
    G1, G2 = torch.randn(3, 4, 2), torch.randn(3, 4, 5)
    rows = _kept_rows({"q": LayerBatch(A, G1, m.clone()), "k": LayerBatch(A, G2, m.clone()),
                       "o": LayerBatch(A.clone(), G2, None)})
    (Aq, Gq, oq), (Ak, Gk, ok), (Ao, Go, oo) = rows["q"], rows["k"], rows["o"]
    assert Aq is Ak and torch.equal(Aq, A[m]) and torch.equal(Gq, G1[m]) and torch.equal(Gk, G2[m])
    assert oq.tolist() == ok.tolist() == [0, 4, 6, 6]
    assert oo.tolist() == [0, 4, 8, 12] and Ao.shape == (12, 6)
    assert Ao.untyped_storage().data_ptr() == rows["o"][0].untyped_storage().data_ptr()
    # bytes: q's and k's shared A rows once (6 x 6), their G rows (6 x 2, 6 x 5), o's A and G
    # whole (views of the captured [3, 4, ·] tensors), three int64 offsets [4]
    assert _held_bytes(rows) == 4 * (6 * 6 + 6 * 2 + 6 * 5) + 4 * (12 * 6 + 12 * 5) + 3 * 8 * 4


@pytest.mark.parametrize("d", [7, 255, 256, 601, 1025])
def test_covariance_lower_triangle(d):
    """The fit's covariance sums fill the lower triangle (what eigh reads), blockwise from 256
    wide on: equal to XᵀX there; blocks above the diagonal are left as they were."""
    from fastinf.ekfac import _add_gram
    g = torch.Generator().manual_seed(d)
    X = torch.randn(40, d, generator=g, dtype=torch.float64)
    C0 = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = _add_gram(C0.clone(), X)
    low = torch.tril(torch.ones(d, d, dtype=torch.bool))
    assert rel(C[low], (C0 + X.T @ X)[low]) < 1e-12
    if d >= 256:    # the blocks above the diagonal blocks are not computed
        assert C[0, d - 1] == C0[0, d - 1]


def test_low_rank_converges(fitted):
    from scipy.stats import spearmanr
    ek, model, loss_fn, mask_fn, train = fitted
    q = tuple(t[:3] for t in train)
    S = ek.pairwise_scores(q, train, batch_size=4)
    full_rank = max(min(L["QA"].shape[0], L["QS"].shape[0]) for L in ek.factors.values())
    rho = [spearmanr(ek.pairwise_scores(q, train, batch_size=4, query_rank=r).flatten(),
                     S.flatten())[0] for r in (1, 3, full_rank)]
    assert rho[-1] >= 0.99
    assert rel(ek.pairwise_scores(q, train, batch_size=4, query_rank=full_rank), S) < 1e-6


def test_bad_inputs(tmp_path, fitted):
    model, loss_fn, _, train = make_case("mlp")
    with pytest.raises(ValueError, match="one loss per example"):
        fastinf.EKFAC(model, lambda m, b: loss_fn(m, b).sum(), progress=False).fit(train)

    bad = train[0][7]

    def is_bad(x):
        return (x == bad).flatten(1).all(1)

    def nan_loss(m, b):
        loss = loss_fn(m, b)
        return torch.where(is_bad(b[0]), float("nan"), loss)
    with pytest.raises(NonFiniteError, match="example 7"):
        fastinf.EKFAC(model, nan_loss, progress=False).fit(train, batch_size=5)

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, rows):
            ctx.save_for_backward(rows)
            return h.clone()

        @staticmethod
        def backward(ctx, go):
            (rows,) = ctx.saved_tensors
            return torch.where(rows[:, None], float("nan"), go), None

    def nan_grad(m, b):  # finite loss, non-finite gradient reaching the first layer's output
        x, y = b
        h = NanGrad.apply(m[0](x), is_bad(x))
        return F.cross_entropy(m[2](m[1](h)), y, reduction="none")
    with pytest.raises(NonFiniteError, match=r"module '0'.*example 7"):
        fastinf.EKFAC(model, nan_grad, progress=False).fit(train, batch_size=5)
    with pytest.raises(ValueError, match="empty"):
        fastinf.EKFAC(model, loss_fn, progress=False).fit((train[0][:0], train[1][:0]))
    with pytest.raises(ValueError, match="no supported modules"):
        fastinf.EKFAC(nn.Sequential(nn.Tanh()), loss_fn)
    with pytest.raises(RuntimeError, match="fit"):
        fastinf.EKFAC(model, loss_fn, progress=False).pairwise_scores(train, train)
    ek = fitted[0]
    p = tmp_path / "f.pt"
    ek.save(p)
    with pytest.raises(ValueError, match="no module"):
        fastinf.EKFAC.load(p, model, loss_fn)
    other = TinyLM(d=5).double()
    with pytest.raises(ValueError, match="shape"):
        fastinf.EKFAC.load(p, other, lm_loss)


def test_float32_and_bf16_models():
    model, loss_fn, mask_fn, train = make_case("mlp")
    ref = fastinf.EKFAC(model, loss_fn, progress=False).fit(train).pairwise_scores(train, train)
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.2)):
        m = copy.deepcopy(model).to(dt)
        tr = (train[0].to(dt), train[1])
        S = fastinf.EKFAC(m, loss_fn, progress=False).fit(tr).pairwise_scores(tr, tr)
        assert S.dtype == torch.float32 and rel(S, ref) < tol


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_ekfac_and_tracin_return_scores_on_the_cpu(device, tmp_path):
    """Both methods run on the model's device and return float32 CPU tensors, also from a store
    (float64 models included: self-scores of EK-FAC used to stay on the model's device)."""
    model, loss_fn, _, (X, y) = make_case("mlp")
    model, train = model.to(device), (X.to(device), y.to(device))
    methods = [fastinf.EKFAC(model, loss_fn, progress=False).fit(train),
               fastinf.TracIn(model, loss_fn, progress=False)]
    for i, m in enumerate(methods):
        store = fastinf.GradientStore.build(tmp_path / str(i), m, train, batch_size=8,
                                            progress=False)
        outs = [m.self_scores(train, batch_size=8), m.self_scores(store),
                m.pairwise_scores(train, train), m.pairwise_scores(train, store),
                *m.top_influences(train, store, k=3)]
        assert all(o.device.type == "cpu" for o in outs)
        assert all(o.dtype == torch.float32 for o in outs[:4])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_readme_example():
    import re
    from pathlib import Path
    text = Path(__file__).resolve().parents[1].joinpath("docs", "ekfac.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(compile(code, "docs/ekfac.md", "exec"), ns)
    assert ns["scores"].shape == (8, 64)


def test_methods_report_what_is_tracked(caplog):
    """EKFAC and TracIn expose ``tracked_modules`` (name -> type, parameter count) and log one
    summary line naming what is left out."""
    import logging
    model = TinyLM()
    for cls in (fastinf.EKFAC, fastinf.TracIn):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fastinf"):
            m = cls(model, lm_loss, progress=False)
        assert m.tracked_modules == {"fc": {"type": "Linear", "params": 6 * 7 + 7},
                                     "out": {"type": "Linear", "params": 7 * 11 + 11}}
        lines = [r.getMessage() for r in caplog.records if r.name == "fastinf"]
        assert lines == ["tracking 2 modules (Linear x2), 137 of 203 trainable parameters; "
                         "left out: Embedding x1 (66 params)"]
        assert list(cls(model, lm_loss, modules=["out"], progress=False).tracked_modules) == ["out"]


@pytest.mark.parametrize("model_dtype, eigh_dtype, expected", [
    (torch.float32, None, torch.float32), (torch.float32, torch.float64, torch.float64),
    (torch.float64, None, torch.float64), (torch.float64, torch.float32, torch.float32)])
def test_eigh_dtype(monkeypatch, model_dtype, eigh_dtype, expected):
    """The covariances are decomposed in ``eigh_dtype`` (None: the factors' dtype, float32 for a
    float32 model); the eigenvalues are kept in float64, the bases in the factors' dtype, and a
    float32 eigh of a float32 model gives the float64 eigh's factors and scores to float32's
    accuracy (bases up to signs and degenerate rotations: compared through A = Q diag(e) Qᵀ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(model_dtype)
    X = torch.randn(40, 5, dtype=model_dtype)
    y = torch.randint(0, 4, (40,))
    seen = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda C, **kw: seen.append(C.dtype) or real(C, **kw))
    ek = fastinf.EKFAC(model, cls_loss, progress=False, eigh_dtype=eigh_dtype).fit((X, y), 8)
    assert seen and set(seen) == {expected}
    monkeypatch.setattr(torch.linalg, "eigh", real)
    ref = fastinf.EKFAC(model, cls_loss, progress=False, eigh_dtype=torch.float64).fit((X, y), 8)
    tol = 1e-4 if torch.float32 in (model_dtype, expected) else 1e-10
    for n, L in ek.factors.items():
        R = ref.factors[n]
        assert L["eigA"].dtype == L["eigS"].dtype == torch.float64
        assert L["QA"].dtype == L["QS"].dtype == ek.dtype
        for Q, e, which in (("QA", "eigA", "A"), ("QS", "eigS", "S")):
            got = L[Q].double() @ torch.diag(L[e]) @ L[Q].double().T
            want = R[Q].double() @ torch.diag(R[e]) @ R[Q].double().T
            assert rel(got, want) < tol, (n, which)
    S, S64 = ek.pairwise_scores((X[:5], y[:5]), (X, y)), ref.pairwise_scores((X[:5], y[:5]), (X, y))
    assert rel(S.double(), S64.double()) < 10 * tol


def test_eigh_dtype_checked():
    with pytest.raises(ValueError, match=r"eigh_dtype must be None.*got torch.float16"):
        fastinf.EKFAC(nn.Linear(3, 2), cls_loss, eigh_dtype=torch.float16)
