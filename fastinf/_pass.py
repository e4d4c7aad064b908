"""One pass over a dataset collecting factored per-example gradients, shared by the algorithms."""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .capture import LayerBatch, capture, eval_mode
from .data import batches, num_examples


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` examples (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False,
                dynamic_ncols=True)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def factor_pass(model: nn.Module, loss_fn: Callable, data, modules: Dict[str, nn.Module],
                batch_size: int, *, token_mask_fn: Optional[Callable] = None,
                desc: str = "fastinf", progress: bool = True, what: str = "loss_fn",
                name: str = "data", select: Optional[Callable[[int], bool]] = None,
                start: int = 0, replay=None, base: int = 0, zero_masked: bool = True
                ) -> Iterator[Tuple[int, Dict[str, LayerBatch]]]:
    """Yields ``(offset, {module: LayerBatch})`` for every batch of ``data``, in order.

    Runs the model in eval mode (restored afterwards) on its own device, with a progress bar.
    ``select(batch_index) -> bool`` skips the capture of unselected batches (data-parallel
    splits, see :mod:`fastinf.distributed`), and so does ``start`` for the batches before the
    example offset ``start`` (already captured). ``replay``: a
    :class:`fastinf.replay.BlockReplay` of this data (batches keyed ``base + offset``) that
    replays the recorded batches where it can and records the others. ``zero_masked``: see
    :func:`fastinf.capture.capture`.
    """
    n = num_examples(data, name)
    if n == 0:
        raise ValueError(f"'{name}' is empty: nothing to compute")
    device = model_device(model)
    with eval_mode(model), progress_bar(n, desc, progress) as bar:
        for bi, (offset, batch) in enumerate(batches(data, batch_size, device, name=name)):
            if offset < start or (select is not None and not select(bi)):
                bar.update(min(batch_size, n - offset))
                continue
            mask = None
            if token_mask_fn is not None:
                mask = token_mask_fn(batch)
                if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                    raise ValueError("token_mask_fn must return a [B, T] bool tensor, got "
                                     f"{getattr(mask, 'shape', type(mask).__name__)}")
            factors = None
            if replay is not None:
                factors = replay.capture(base + offset, modules, mask, what)
            if factors is None:
                factors = capture(model, loss_fn, batch, modules, token_mask=mask, offset=offset,
                                  what=what, record=None if replay is None
                                  else replay.recorder(base + offset), zero_masked=zero_masked)
            b = next(iter(factors.values())).A.shape[0]
            box = [factors]     # not held by this frame while the consumer has it (a train
            del factors         # tile would keep its last batch alive beside it)
            yield offset, box.pop()
            bar.update(b)
