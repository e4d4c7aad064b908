"""Capture of per-example gradient factors against autograd: which layers are tracked, grouped
convolutions, frozen biases, transformers' Conv1D, nn.MultiheadAttention, token masks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinf
from fastinf import capture as cap
from fastinf.capture import capture, layer_shape, tracked_modules


def _ce(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                           reduction="none").reshape(y.shape[0], -1).sum(1)


def _params_of(modules):
    """Trainable parameters of the tracked modules (what the scores are over)."""
    return [p for m in modules.values() for p in m.parameters(recurse=False) if p.requires_grad]


def _autograd_gram(model, loss_fn, batch, params):
    """``K[i, j] = <∇θ loss_i, ∇θ loss_j>`` over ``params`` from a per-example autograd loop."""
    x, y = batch
    rows = []
    for i in range(x.shape[0]):
        loss = loss_fn(model, (x[i:i + 1], y[i:i + 1])).sum()
        gs = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    J = torch.stack(rows)
    return J @ J.T


def _capture_gram(model, loss_fn, batch, modules, token_mask=None):
    fac = capture(model, loss_fn, batch, modules, token_mask=token_mask)
    K = 0
    for lb in fac.values():
        D = torch.einsum("bti,btj->bij", lb.G, lb.A).flatten(1)
        K = K + D @ D.T
    return K


def _assert_close(K, ref, tol=1e-9):
    err = float((K.double() - ref).abs().max() / ref.abs().max())
    assert err < tol, f"relative max error {err:.3g} against autograd"


# --------------------------------------------------------------------------- grouped conv (12.1)
class _GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6, bias=False)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = torch.tanh(self.grouped(h))
        return self.head(torch.tanh(self.depthwise(h)).flatten(1))


def test_grouped_conv_left_out_of_default_and_scores_match_autograd():
    model = _GroupedNet().double()
    batch = (torch.randn(6, 4, 6, 6, dtype=torch.float64), torch.randint(0, 5, (6,)))
    mods = tracked_modules(model)
    assert list(mods) == ["conv", "head"]
    _assert_close(_capture_gram(model, _ce, batch, mods),
                  _autograd_gram(model, _ce, batch, _params_of(mods)))
    s = cap.tracking_summary(model, mods)
    assert s["left_out"]["Conv2d(groups>1)"] == {"modules": 2, "params": 6 * 2 * 9 + 6 + 6 * 9}


def test_grouped_conv_named_explicitly_is_a_clear_error():
    model = _GroupedNet()
    with pytest.raises(TypeError, match=r"'grouped' is a grouped Conv2d \(groups=3\)"):
        tracked_modules(model, ["conv", "grouped"])


# --------------------------------------------------------------------------- frozen bias (12.6)
def test_frozen_bias_contributes_nothing():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model[0].bias.requires_grad_(False)
    mods = tracked_modules(model)
    assert layer_shape(model[0]) == (7, 5) and layer_shape(model[2]) == (3, 8)
    batch = (torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))
    fac = capture(model, _ce, batch, mods)
    assert fac["0"].din == 5 and fac["2"].din == 8
    _assert_close(_capture_gram(model, _ce, batch, mods),
                  _autograd_gram(model, _ce, batch, _params_of(mods)))


def test_frozen_conv_bias():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 4)).double()
    model[0].bias.requires_grad_(False)
    mods = tracked_modules(model)
    assert layer_shape(model[0]) == (3, 18)
    batch = (torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,)))
    _assert_close(_capture_gram(model, _ce, batch, mods),
                  _autograd_gram(model, _ce, batch, _params_of(mods)))


def test_frozen_bias_ekfac_end_to_end():
    """layer_shape, capture and the fitted factors agree on din (no bias column)."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model[2].bias.requires_grad_(False)
    data = (torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,)))
    ek = fastinf.EKFAC(model, _ce, progress=False).fit(data, batch_size=8)
    assert ek.factors["2"]["lam"].shape == (3, 7)
    S = ek.pairwise_scores(data, data, batch_size=8)
    assert torch.isfinite(S).all()


# --------------------------------------------------------------------------- Conv1D (11.1)
class Conv1D(nn.Module):
    """Mirrors transformers.pytorch_utils.Conv1D: a Linear with the weight stored [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def _seq_models(conv1d_cls):
    """The same weights as a Conv1D model and as an nn.Linear model (tokens [B, T, d])."""
    torch.manual_seed(3)
    c1, c2 = conv1d_cls(12, 6), conv1d_cls(4, 12)
    conv = nn.Sequential(c1, nn.GELU(), c2).double()
    lin = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4)).double()
    with torch.no_grad():
        for cm, lm in ((conv[0], lin[0]), (conv[2], lin[2])):
            lm.weight.copy_(cm.weight.T)
            lm.bias.copy_(cm.bias)
    return conv, lin


def _check_conv1d_equals_linear(conv1d_cls):
    conv, lin = _seq_models(conv1d_cls)
    assert list(tracked_modules(conv)) == ["0", "2"]
    assert layer_shape(conv[0]) == layer_shape(lin[0]) == (12, 7)
    x = torch.randn(10, 5, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (10, 5))
    data = (x, y)
    fc = capture(conv, _ce, data, tracked_modules(conv))
    fl = capture(lin, _ce, data, tracked_modules(lin))
    for n in fc:
        torch.testing.assert_close(torch.einsum("bti,btj->bij", fc[n].G, fc[n].A),
                                   torch.einsum("bti,btj->bij", fl[n].G, fl[n].A))
    _assert_close(_capture_gram(conv, _ce, data, tracked_modules(conv)),
                  _autograd_gram(conv, _ce, data, list(conv.parameters())))
    q = (x[:3], y[:3])
    for make in (lambda m: fastinf.EKFAC(m, _ce, progress=False).fit(data, batch_size=4),
                 lambda m: fastinf.TracIn(m, _ce, progress=False)):
        a, b = make(conv), make(lin)
        torch.testing.assert_close(a.pairwise_scores(q, data, batch_size=4),
                                   b.pairwise_scores(q, data, batch_size=4))
        torch.testing.assert_close(a.self_scores(data, batch_size=4),
                                   b.self_scores(data, batch_size=4))


def test_conv1d_tracked_like_linear():
    _check_conv1d_equals_linear(Conv1D)


def test_transformers_conv1d_tracked_like_linear():
    pu = pytest.importorskip("transformers.pytorch_utils",
                             reason="transformers is not installed (optional; the duck-typed "
                                    "Conv1D above covers the same layout)")
    _check_conv1d_equals_linear(pu.Conv1D)


# --------------------------------------------------------------------------- MultiheadAttention
def _encoder():
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
                         nn.Linear(8, 3)).double()


def test_multihead_attention_left_out_and_reported():
    model = _encoder()
    mods = tracked_modules(model)
    assert all("self_attn" not in n for n in mods), list(mods)
    assert sum(n.endswith("linear1") for n in mods) == 2 and "1" in mods
    s = cap.tracking_summary(model, mods)
    mha = 3 * 8 * 8 + 3 * 8 + 8 * 8 + 8
    assert s["left_out"]["MultiheadAttention"] == {"modules": 2, "params": 2 * mha}
    assert s["left_out"]["LayerNorm"] == {"modules": 4, "params": 4 * 16}
    total = sum(p.numel() for p in model.parameters())
    assert s["trainable_params"] == total
    assert s["tracked_params"] == total - 2 * mha - 4 * 16
    with pytest.raises(TypeError, match="MultiheadAttention"):
        tracked_modules(model, ["0.layers.0.self_attn.out_proj"])


def test_transformer_encoder_fits_with_defaults():
    model = _encoder()
    x = torch.randn(12, 5, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (12, 5))
    data = (x, y)
    mods = tracked_modules(model)
    _assert_close(_capture_gram(model, _ce, data, mods),
                  _autograd_gram(model, _ce, data, _params_of(mods)))
    ek = fastinf.EKFAC(model, _ce, progress=False).fit(data, batch_size=4)
    S = ek.pairwise_scores((x[:3], y[:3]), data, batch_size=4)
    s = ek.self_scores(data, batch_size=4)
    assert S.shape == (3, 12) and torch.isfinite(S).all() and (s > 0).all()
    tr = fastinf.TracIn(model, _ce, progress=False)
    T = tr.pairwise_scores(data, data, batch_size=4)
    _assert_close(T, _autograd_gram(model, _ce, data, _params_of(mods)), tol=1e-5)  # TracIn: float32


# --------------------------------------------------------------------------- summary
def test_tracking_summary_and_line():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[3].weight.requires_grad_(False)
    model[3].bias.requires_grad_(False)
    mods = tracked_modules(model)
    s = cap.tracking_summary(model, mods)
    assert s["tracked"] == {"1": {"type": "Linear", "params": 20}}
    assert s["left_out"] == {"Embedding": {"modules": 1, "params": 40},
                             "LayerNorm": {"modules": 1, "params": 8}}
    assert s["tracked_params"] == 20 and s["trainable_params"] == 68
    line = s["line"]
    assert "\n" not in line
    for needle in ("1 module", "20 of 68 trainable parameters", "Embedding", "LayerNorm"):
        assert needle in line, line


# --------------------------------------------------------------------------- token masks (12.3)
class _Twice(nn.Module):
    """A sequence model whose shared layer is called twice per forward (weight tying)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.head(torch.tanh(self.shared(h)))


def _masked_ce(mask):
    def fn(model, batch):
        x, y = batch
        out = model(x)
        l_ = F.cross_entropy(out.reshape(-1, 2), y.reshape(-1), reduction="none").reshape(y.shape)
        return (l_ * mask[: x.shape[0]]).sum(1)
    return fn


def test_mask_applies_to_every_call_of_a_shared_layer():
    """Masked tokens are dropped from every call: same gradient factors as a model that never saw them
    (the loss ignores them; tokens do not interact, so the masked positions are exactly removed)."""
    torch.manual_seed(5)
    model = _Twice().double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    mods = tracked_modules(model)
    fac = capture(model, _masked_ce(mask), (x, y), mods, token_mask=mask)
    assert fac["shared"].A.shape[1] == 12
    ref = capture(model, _masked_ce(mask[:, :4]), (x[:, :4], y[:, :4]), mods)
    for n in mods:
        D = torch.einsum("bti,btj->bij", fac[n].G, fac[n].A)
        Dr = torch.einsum("bti,btj->bij", ref[n].G, ref[n].A)
        torch.testing.assert_close(D, Dr)
        assert fac[n].mask.shape == fac[n].A.shape[:2]
        # masked token inputs are zeroed (not only their gradients)
        assert not fac[n].A[~fac[n].mask].any()


class _QKV(nn.Module):
    """Three bias-free projections of one input (an attention's q, k, v) and a head."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(3, 4, bias=False) for _ in range(3))
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.head(self.q(x) * self.k(x).tanh() + self.v(x))


def _qkv_capture(bias: bool):
    """``(model, x, y, mask, modules, factors)`` of a masked capture of :class:`_QKV`."""
    torch.manual_seed(6)
    model = _QKV().double()
    if bias:
        for m in (model.q, model.k, model.v):
            m.bias = nn.Parameter(torch.randn(4, dtype=torch.float64))
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4, 6))
    mask = torch.rand(4, 6) < 0.7
    mods = tracked_modules(model)
    return model, x, y, mask, mods, capture(model, _masked_ce(mask), (x, y), mods, token_mask=mask)


def test_masked_input_shared_by_layers_is_one_tensor():
    """q, k and v read the same input: their masked token inputs are one tensor (kept once by
    fit), zeroed where masked, and their factors are those of separate copies."""
    model, x, y, mask, mods, fac = _qkv_capture(bias=False)
    assert fac["q"].A is fac["k"].A is fac["v"].A
    assert fac["head"].A is not fac["q"].A
    torch.testing.assert_close(fac["q"].A, x.masked_fill(~mask[..., None], 0))
    assert x.abs().min() > 0          # the model's input itself is not zeroed
    for n in ("q", "k", "v"):
        assert not fac[n].G[~mask].any()
        assert torch.equal(fac[n].mask, mask)


def test_biased_layers_reading_one_input_share_its_tokens():
    """With a bias column (a new tensor per layer before), q, k, v still share one token tensor,
    masked in place once; each layer's factors equal those captured alone."""
    model, x, y, mask, mods, fac = _qkv_capture(bias=True)
    assert fac["q"].A is fac["k"].A is fac["v"].A
    ref = torch.cat([x, torch.ones(4, 6, 1, dtype=torch.float64)], 2).masked_fill(
        ~mask[..., None], 0)
    torch.testing.assert_close(fac["q"].A, ref)
    for n in ("q", "k", "v"):
        alone = capture(model, _masked_ce(mask), (x, y), {n: mods[n]}, token_mask=mask)[n]
        torch.testing.assert_close(alone.A, fac[n].A)
        torch.testing.assert_close(alone.G, fac[n].G)


def test_mask_of_wrong_shape_names_module_and_shapes():
    model = _Twice().double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4, 6))
    mods = tracked_modules(model)
    bad = torch.ones(4, 7, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"token mask of shape \(4, 7\).*'inp'.*\[4, 6\]"):
        capture(model, _masked_ce(torch.ones(4, 6)), (x, y), mods, token_mask=bad)
    with pytest.raises(ValueError, match=r"token mask of shape \(3, 6\)"):
        capture(model, _masked_ce(torch.ones(4, 6)), (x, y), mods, token_mask=bad[:3, :6])


def test_mask_through_ekfac_wrong_shape_raises():
    model = _Twice().double()
    data = (torch.randn(8, 6, 3, dtype=torch.float64), torch.randint(0, 2, (8, 6)))
    ek = fastinf.EKFAC(model, _masked_ce(torch.ones(8, 6)), progress=False,
                       token_mask_fn=lambda b: torch.ones(b[0].shape[0], 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="token mask"):
        ek.fit(data, batch_size=4)


def test_mask_skips_single_token_modules_only():
    """A head on a pooled vector (one token per example) ignores the mask, by design; a conv layer
    whose token count is not T is an error."""
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.tok(x)).mean(1))

    model = Pooled().double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[:, -1] = False
    fac = capture(model, _ce, (x, y), tracked_modules(model), token_mask=mask)
    assert fac["head"].mask is None and fac["tok"].mask is not None

    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 9, 2)).double()
    xc = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'0'.*9 tokens"):
        capture(conv, _ce, (xc, y), tracked_modules(conv), token_mask=mask)


# --------------------------------------------------------------------------- scalar loss (12.12)
def test_scalar_loss_message_says_per_example():
    model = nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match=r"loss_fn returned a scalar.*reduction='none'"):
        capture(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batch,
                tracked_modules(model))


def test_documented_summary_line_is_what_the_code_prints():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "constraints.md").read_text()
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
                          nn.Linear(8, 3))
    line = cap.tracking_summary(model, tracked_modules(model))["line"]
    assert "    " + line + "\n" in doc, line
