"""Capture of the factored per-example gradients ``(a_t, g_t)`` of tracked layers.

For a tracked ``nn.Linear`` the tokens are all positions of the input except the batch dimension
(``[B, ..., in] -> [B, T, in]``); for ``nn.Conv2d`` the input is unfolded into patches, each patch
a token (``[B, Cin, H, W] -> [B, Ho·Wo, Cin·kh·kw]``). With a bias, a constant 1 is appended to
``a_t`` so ``din = in + 1`` and the bias gradient is the last column of ``D_n = G_nᵀ A_n``.

The gradient ``g_t`` is that of the example's own loss (``loss_fn`` returns one loss per example
and the batch sum is differentiated, so examples must not interact: use ``model.eval()`` for
batch norm). A module called several times per forward contributes the tokens of every call.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Dict, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerBatch

SUPPORTED = (nn.Linear, nn.Conv2d)


class NonFiniteError(ValueError):
    """A loss or a captured gradient holds NaN/Inf; the message names the module and example."""


def tracked_modules(model: nn.Module, modules=None) -> "OrderedDict[str, nn.Module]":
    """Resolves ``modules`` (None, or names / module objects) to ``{name: module}``.

    Default: every ``nn.Linear`` and ``nn.Conv2d`` whose weight requires grad.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = OrderedDict(model.named_modules())
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    if modules is None:
        for name, m in named.items():
            if isinstance(m, SUPPORTED) and m.weight.requires_grad:
                out[name] = m
        if not out:
            raise ValueError("the model has no supported modules to track (nn.Linear or nn.Conv2d "
                             "with trainable weights); pass modules=[...] or check requires_grad")
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
        if not isinstance(m, SUPPORTED):
            raise TypeError(f"modules: {name!r} is a {type(m).__name__}; supported module types are "
                            "nn.Linear and nn.Conv2d")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise TypeError(f"modules: {name!r} is a grouped Conv2d (groups={m.groups}); only groups=1 "
                            "is supported")
        if not m.weight.requires_grad:
            raise ValueError(f"modules: {name!r} has a frozen weight (requires_grad=False)")
        out[name] = m
    if not out:
        raise ValueError("modules: empty list; pass None to track every supported module")
    return out


def layer_shape(module: nn.Module):
    """``(dout, din)`` of the module's gradient matrix ``D`` (din includes the bias column)."""
    if isinstance(module, nn.Linear):
        dout, din = module.out_features, module.in_features
    else:
        kh, kw = module.kernel_size
        dout, din = module.out_channels, module.in_channels * kh * kw
    return dout, din + (1 if module.bias is not None else 0)


def _tokens_in(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    if isinstance(module, nn.Linear):
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
    if module.bias is not None:
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
    if isinstance(module, nn.Linear):
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


def capture(model: nn.Module, loss_fn: Callable, batch, modules: Dict[str, nn.Module], *,
            token_mask: Optional[torch.Tensor] = None, offset: int = 0,
            what: str = "loss_fn", check_finite: bool = True) -> Dict[str, LayerBatch]:
    """Runs ``loss_fn(model, batch)`` and returns ``{name: LayerBatch}`` for the tracked modules.

    ``token_mask`` ``[B, T]`` (bool) applies to every module whose token count is T (sequence
    layers); excluded tokens are zeroed in A and G and marked in ``mask``. ``offset`` is the
    dataset index of the batch's first example, used in error messages.
    """
    inputs: Dict[str, list] = {n: [] for n in modules}
    outputs: Dict[str, list] = {n: [] for n in modules}
    handles = []

    def make_hook(name):
        def hook(mod, args, out):
            if not torch.is_grad_enabled():
                return
            inputs[name].append(_tokens_in(mod, args[0].detach()))
            outputs[name].append(out)
        return hook

    for name, m in modules.items():
        handles.append(m.register_forward_hook(make_hook(name)))
    try:
        with torch.enable_grad():
            losses = loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    B = None
    for v in inputs.values():
        if v:
            B = v[0].shape[0]
            break
    if B is None:
        raise ValueError(f"{what} ran, but none of the tracked modules ({', '.join(modules)}) was "
                         "called: is the model used inside it?")
    _check_losses(losses, B, offset, what)
    names = [n for n in modules if outputs[n]]
    flat = [o for n in names for o in outputs[n]]
    grads = torch.autograd.grad(losses.sum(), flat, allow_unused=True)
    result: Dict[str, LayerBatch] = {}
    k = 0
    for name in names:
        gs = []
        for o in outputs[name]:
            g = grads[k]
            k += 1
            gs.append(_tokens_out(modules[name], torch.zeros_like(o) if g is None else g))
        A = torch.cat(inputs[name], dim=1) if len(inputs[name]) > 1 else inputs[name][0]
        G = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
        if check_finite:
            bad = ~torch.isfinite(G).flatten(1).all(1)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise NonFiniteError(f"non-finite gradient (NaN/Inf) at module {name!r} for example "
                                     f"{offset + i}")
        mask = None
        if token_mask is not None and token_mask.dim() == 2 and token_mask.shape == A.shape[:2]:
            mask = token_mask.to(device=A.device, dtype=torch.bool)
            A = torch.where(mask[..., None], A, 0)
            G = torch.where(mask[..., None], G, 0)
        result[name] = LayerBatch(A, G, mask)
    for name in modules:
        if name not in result:
            raise ValueError(f"tracked module {name!r} was not called by {what}; drop it from modules")
    return result
