"""Capture of the factored per-example gradients ``(a_t, g_t)`` of tracked layers.

For a tracked ``nn.Linear`` (or transformers' ``Conv1D``, weight stored ``[in, out]``) the tokens
are all positions of the input except the batch dimension (``[B, ..., in] -> [B, T, in]``); for
``nn.Conv2d`` (``groups=1``) the input is unfolded into patches, each patch a token
(``[B, Cin, H, W] -> [B, Ho·Wo, Cin·kh·kw]``). With a trainable bias, a constant 1 is appended to
``a_t`` so ``din = in + 1`` and the bias gradient is the last column of ``D_n = G_nᵀ A_n``; a
frozen bias (``requires_grad=False``) has no column. ``D`` is always ``[out, in]`` (for Conv1D
the transpose of its weight), so scores equal those of the model written with ``nn.Linear``.

The gradient ``g_t`` is that of the example's own loss (``loss_fn`` returns one loss per example
and the batch sum is differentiated, so examples must not interact: use ``model.eval()`` for
batch norm). A module called several times per forward contributes the tokens of every call.
See docs/constraints.md for what is tracked and what is not.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerBatch

SUPPORTED = (nn.Linear, nn.Conv2d)


class NonFiniteError(ValueError):
    """A loss or a captured gradient holds NaN/Inf; the message names the module and example."""


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` by duck typing: ``nf`` outputs, weight ``[nx, nf]``, bias ``[nf]``,
    ``forward(x) = x @ weight + bias`` (a Linear with the weight stored transposed)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return False
    nf, w, b = getattr(module, "nf", None), getattr(module, "weight", None), getattr(module, "bias", None)
    return (isinstance(nf, int) and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.shape[1] == nf and (b is None or (isinstance(b, torch.Tensor) and b.shape == (nf,))))


def _mha_owned(model: nn.Module) -> set:
    """ids of the submodules of every ``nn.MultiheadAttention`` (its ``out_proj`` is never called)."""
    return {id(sub) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
            for sub in m.modules() if sub is not m}


def _unsupported(module: nn.Module, mha_owned: set) -> Optional[str]:
    """Why ``module`` cannot be tracked, or None when it can."""
    if id(module) in mha_owned:
        return ("part of an nn.MultiheadAttention, which uses its weights directly instead of "
                "calling the module, so its gradient cannot be captured; MultiheadAttention is not "
                "tracked (write the attention with nn.Linear projections to track it)")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return (f"a grouped Conv2d (groups={module.groups}); only groups=1 is supported (a grouped "
                "or depthwise convolution is left out of the default set)")
    if not (isinstance(module, SUPPORTED) or is_conv1d(module)):
        return (f"a {type(module).__name__}; supported module types are nn.Linear, nn.Conv2d "
                "(groups=1) and transformers' Conv1D")
    return None


def tracked_modules(model: nn.Module, modules=None) -> "OrderedDict[str, nn.Module]":
    """Resolves ``modules`` (None, or names / module objects) to ``{name: module}``.

    Default: every ``nn.Linear``, ``nn.Conv2d`` with ``groups=1`` and transformers ``Conv1D``
    whose weight requires grad, except the ``out_proj`` of ``nn.MultiheadAttention`` (not called
    as a module). What is left out is listed by :func:`tracking_summary`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = OrderedDict(model.named_modules())
    owned = _mha_owned(model)
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    if modules is None:
        for name, m in named.items():
            if _unsupported(m, owned) is None and m.weight.requires_grad:
                out[name] = m
        if not out:
            raise ValueError("the model has no supported modules to track (nn.Linear, nn.Conv2d "
                             "with groups=1 or transformers' Conv1D, with trainable weights); pass "
                             "modules=[...] or check requires_grad")
        return out
    if isinstance(modules, (str, nn.Module)):
        modules = [modules]
    by_id = {id(m): n for n, m in named.items()}
    for item in modules:
        if isinstance(item, str):
            if item not in named:
                close = [n for n in named if item in n][:5]
                raise ValueError(f"modules: the model has no submodule named {item!r}"
                                 + (f"; similar names: {close}" if close else ""))
            name, m = item, named[item]
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"modules: {type(item).__name__} object is not a submodule of the model")
            name, m = by_id[id(item)], item
        else:
            raise TypeError(f"modules: entries must be names or nn.Module objects, got {type(item).__name__}")
        why = _unsupported(m, owned)
        if why is not None:
            raise TypeError(f"modules: {name!r} is {why}")
        if not m.weight.requires_grad:
            raise ValueError(f"modules: {name!r} has a frozen weight (requires_grad=False)")
        out[name] = m
    if not out:
        raise ValueError("modules: empty list; pass None to track every supported module")
    return out


def has_bias(module: nn.Module) -> bool:
    """Whether ``D`` has a bias column: the module has a bias and it is trainable."""
    return module.bias is not None and module.bias.requires_grad


def _tracked_params(module: nn.Module):
    return [module.weight] + ([module.bias] if has_bias(module) else [])


def tracking_summary(model: nn.Module, modules: Dict[str, nn.Module]) -> dict:
    """What is tracked and what is not, for ``method.tracked_modules`` and a one-line log.

    Returns ``{"tracked": {name: {"type", "params"}}, "left_out": {type: {"modules", "params"}},
    "tracked_params", "trainable_params", "line"}``. ``left_out`` lists every module holding
    trainable parameters that are not tracked (Embedding, LayerNorm, MultiheadAttention (counted
    with its out_proj), grouped convolutions as ``"Conv2d(groups>1)"``, ...); a parameter shared
    by several modules is counted once, with the tracked module when one tracks it.
    """
    seen = set()

    def count(params):
        n = 0
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    tracked = OrderedDict((name, {"type": type(m).__name__, "params": count(_tracked_params(m))})
                          for name, m in modules.items())
    tracked_ids = {id(m) for m in modules.values()}
    owned = _mha_owned(model)
    left: Dict[str, dict] = {}
    for _, m in model.named_modules():
        if id(m) in tracked_ids or id(m) in owned:
            continue
        n = count(m.parameters() if isinstance(m, nn.MultiheadAttention)
                  else m.parameters(recurse=False))
        if n:
            key = type(m).__name__ + ("(groups>1)" if isinstance(m, nn.Conv2d) and m.groups != 1
                                      else "")
            e = left.setdefault(key, {"modules": 0, "params": 0})
            e["modules"] += 1
            e["params"] += n
    n_tracked = sum(t["params"] for t in tracked.values())
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    types: Dict[str, int] = {}
    for t in tracked.values():
        types[t["type"]] = types.get(t["type"], 0) + 1
    line = (f"tracking {len(tracked)} module{'s' if len(tracked) != 1 else ''} ("
            + ", ".join(f"{k} x{v}" for k, v in types.items())
            + f"), {n_tracked:,} of {total:,} trainable parameters; left out: "
            + (", ".join(f"{k} x{e['modules']} ({e['params']:,} params)" for k, e in left.items())
               or "none"))
    return {"tracked": tracked, "left_out": left, "tracked_params": n_tracked,
            "trainable_params": total, "line": line}


def layer_shape(module: nn.Module):
    """``(dout, din)`` of the module's gradient matrix ``D`` (din includes the bias column when
    the bias is trainable)."""
    if isinstance(module, nn.Linear):
        dout, din = module.out_features, module.in_features
    elif is_conv1d(module):
        dout, din = module.nf, module.weight.shape[0]
    else:
        kh, kw = module.kernel_size
        dout, din = module.out_channels, module.in_channels * kh * kw
    return dout, din + (1 if has_bias(module) else 0)


def _tokens_in(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    if not isinstance(module, nn.Conv2d):  # Linear, Conv1D
        a = x.reshape(B, -1, x.shape[-1])
    else:
        if module.padding_mode != "zeros":
            pad = module._reversed_padding_repeated_twice
            x = F.pad(x, pad, mode=module.padding_mode)
            padding = 0
        else:
            padding = module.padding
        if isinstance(padding, str):  # "same" / "valid"
            padding = _conv_str_padding(module, padding)
        a = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                     stride=module.stride).transpose(1, 2)
    if has_bias(module):
        a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
    return a


def _conv_str_padding(module, padding):
    if padding == "valid":
        return 0
    # "same" (stride 1): total padding dilation*(k-1), split as torch does (extra on the right).
    pads = []
    for k, d in zip(module.kernel_size, module.dilation):
        total = d * (k - 1)
        if total % 2:
            raise TypeError("Conv2d with padding='same' and an even effective kernel size is not "
                            "supported; use explicit padding")
        pads.append(total // 2)
    return tuple(pads)


def _tokens_out(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    B = g.shape[0]
    if not isinstance(module, nn.Conv2d):  # Linear, Conv1D
        return g.reshape(B, -1, g.shape[-1])
    return g.reshape(B, g.shape[1], -1).transpose(1, 2)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Runs with ``model.eval()`` (no dropout, batch norm in inference) and restores the modes."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


def _check_losses(losses, B: int, offset: int, what: str):
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{what} must return a tensor of per-example losses of shape [{B}], "
                        f"got {type(losses).__name__}")
    if losses.dim() == 0:
        raise ValueError(f"{what} returned a scalar (a batch mean, as with reduction='mean' or a "
                         "Hugging Face model(...).loss) but must return one loss per example, a "
                         f"tensor of shape [{B}]: compute the loss with reduction='none' and sum "
                         "over each example's tokens")
    if losses.shape != (B,):
        raise ValueError(f"{what} must return one loss per example, a tensor of shape [{B}] "
                         f"(the batch size), got shape {tuple(losses.shape)}; use reduction='none' "
                         "and sum over each example's tokens")
    if not losses.requires_grad:
        raise ValueError(f"{what} returned losses that do not require grad: compute them from "
                         "the model's output inside the function")
    bad = ~torch.isfinite(losses.detach())
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise NonFiniteError(f"{what} returned a non-finite loss ({float(losses[i].detach())}) for example "
                             f"{offset + i}")


def _check_mask(token_mask, B: int) -> torch.Tensor:
    if not isinstance(token_mask, torch.Tensor) or token_mask.dim() != 2 or token_mask.shape[0] != B:
        raise ValueError(f"token_mask_fn: token mask of shape "
                         f"{tuple(getattr(token_mask, 'shape', ())) or type(token_mask).__name__} "
                         f"does not match the batch; expected a [B, T] bool tensor with B = {B}")
    return token_mask.to(dtype=torch.bool)


def _call_mask(token_mask: torch.Tensor, a: torch.Tensor, name: str) -> Optional[torch.Tensor]:
    """The mask of one call of module ``name`` with token inputs ``a`` [B, t, din]."""
    t = a.shape[1]
    if t == token_mask.shape[1]:
        return token_mask.to(a.device)
    if t == 1:  # one token per example (pooled input): nothing to mask
        return None
    raise ValueError(f"token_mask_fn: token mask of shape {tuple(token_mask.shape)} does not fit "
                     f"tracked module {name!r}, which sees {t} tokens per example (expected mask "
                     f"[{a.shape[0]}, {t}]); only modules with one token per example (pooled "
                     "inputs) ignore the mask: fix token_mask_fn, or track only the sequence "
                     "layers with modules=[...]")


def _view_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that view the same memory the same way (while both are alive)."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device


@contextlib.contextmanager
def recording(modules: Dict[str, nn.Module]):
    """Forward hooks on ``modules`` for the duration: yields ``(inputs, outputs)``, per module
    the token inputs ``[B, t, din]`` (detached) and the outputs of each call under grad."""
    inputs: Dict[str, list] = {n: [] for n in modules}
    outputs: Dict[str, list] = {n: [] for n in modules}
    built: dict = {}    # (input view) -> (input, its tokens with a bias column): q, k, v share

    def make_hook(name):
        def hook(mod, args, out):
            if not torch.is_grad_enabled():
                return
            x = args[0].detach()
            if has_bias(mod) and not isinstance(mod, nn.Conv2d):
                key = _view_key(x)
                if key not in built:    # x held too: its address is not reused meanwhile
                    built[key] = (x, _tokens_in(mod, x))
                inputs[name].append(built[key][1])
            else:
                inputs[name].append(_tokens_in(mod, x))
            outputs[name].append(out)
        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


def _batch_size(inputs, modules, what) -> int:
    for v in inputs.values():
        if v:
            return v[0].shape[0]
    raise ValueError(f"{what} ran, but none of the tracked modules ({', '.join(modules)}) was "
                     "called: is the model used inside it?")


def capture(model: nn.Module, loss_fn: Callable, batch, modules: Dict[str, nn.Module], *,
            token_mask: Optional[torch.Tensor] = None, offset: int = 0,
            what: str = "loss_fn", check_finite: bool = True, record=None,
            zero_masked: bool = True) -> Dict[str, LayerBatch]:
    """Runs ``loss_fn(model, batch)`` and returns ``{name: LayerBatch}`` for the tracked modules.

    ``token_mask`` ``[B, T]`` (bool) applies to every call of a tracked module that sees T tokens
    per example (a module called twice gets it on both calls); excluded tokens are zeroed in A
    and G and marked in ``mask``. A call with one token per example (a head on a pooled vector)
    keeps it unmasked; any other token count is an error naming the module and the shapes.
    ``offset`` is the dataset index of the batch's first example, used in error messages.
    ``record``: a :class:`fastinf.replay.BlockRecorder` that keeps the blocks' inputs and
    output gradients of this batch (:mod:`fastinf.replay`). ``zero_masked=False`` leaves the
    excluded tokens of A and G as they are (only ``mask`` marks them), for a consumer that
    drops them itself (the EK-FAC fit keeps the unmasked rows only): no masked copies.
    """
    with recording(modules) as (inputs, outputs), \
            (record.watch() if record is not None else contextlib.nullcontext()):
        with torch.enable_grad():
            losses = loss_fn(model, batch)
    B = _batch_size(inputs, modules, what)
    _check_losses(losses, B, offset, what)
    names = [n for n in modules if outputs[n]]
    flat = [o for n in names for o in outputs[n]]
    extra = record.outputs() if record is not None else []
    grads = torch.autograd.grad(losses.sum(), flat + extra, allow_unused=True)
    if record is not None:
        record.keep(grads[len(flat):])
    return collect(modules, names, inputs, outputs, grads, token_mask, offset, what, check_finite,
                   zero_masked)


def collect(modules, names, inputs, outputs, grads, token_mask, offset: int, what: str,
            check_finite: bool = True, zero_masked: bool = True) -> Dict[str, LayerBatch]:
    """``{name: LayerBatch}`` from the recorded inputs, outputs and the gradients w.r.t. the
    outputs (``grads``, in the order of ``names`` and their calls), masked and checked."""
    B = _batch_size(inputs, modules, what)
    if token_mask is not None:
        token_mask = _check_mask(token_mask, B)
    result: Dict[str, LayerBatch] = {}
    sums: list = []     # one sum per gradient: a single finiteness check for the whole batch
    shared: dict = {}   # (token input view) -> (mask, its masked form)
    k = 0
    for name in names:
        As, gs, masks = inputs[name], [], []
        for a, o in zip(As, outputs[name]):
            g = grads[k]
            k += 1
            gs.append(_tokens_out(modules[name], torch.zeros_like(o) if g is None else g))
            masks.append(None if token_mask is None else _call_mask(token_mask, a, name))
        if check_finite:
            sums.extend(G.sum() for G in gs)
        mask = None
        if any(m is not None for m in masks):
            mask = torch.cat([a.new_ones(a.shape[:2], dtype=torch.bool) if m is None else m
                              for a, m in zip(As, masks)], dim=1)
        A = torch.cat(As, dim=1) if len(As) > 1 else As[0]
        G = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
        if mask is not None and zero_masked:
            # in place where the tensor is this capture's own (G always: fresh gradients; A when
            # built here: a bias column, unfolded patches, several calls), else a masked copy
            # (A a view of the module's input, which other modules and autograd still read)
            off = ~mask[..., None]
            own = len(As) > 1 or has_bias(modules[name]) or isinstance(modules[name], nn.Conv2d)
            # layers reading one tensor (an attention's q, k, v) share its masked form, made once
            hit = shared.get(_view_key(A))
            if hit is not None and torch.equal(hit[0], mask):
                A = hit[1]
            else:
                key = _view_key(A)
                A = A.masked_fill_(off, 0) if own else A.masked_fill(off, 0)
                shared[key] = (mask, A)
            G = G.masked_fill_(off, 0)
        result[name] = LayerBatch(A, G, mask)
    for name in modules:
        if name not in result:
            raise ValueError(f"tracked module {name!r} was not called by {what}; drop it from modules")
    if sums and not bool(torch.isfinite(torch.stack([x.float() for x in sums])).all()):
        _name_nonfinite(names, outputs, grads, offset)
    return result


def _name_nonfinite(names, outputs, grads, offset: int):
    """Raises for the first module and example whose output gradient holds NaN/Inf (a non-finite
    sum of finite gradients, i.e. an overflow of the sum alone, passes)."""
    k = 0
    for name in names:
        for _ in outputs[name]:
            g = grads[k]
            k += 1
            if g is None:
                continue
            bad = ~torch.isfinite(g).reshape(g.shape[0], -1).all(1)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise NonFiniteError(f"non-finite gradient (NaN/Inf) at module {name!r} for "
                                     f"example {offset + i}")
