"""Data plumbing shared by the algorithms: batching any of the accepted inputs, moving to a device.

Accepted data: a ``torch.utils.data.Dataset``, a sequential ``DataLoader`` (one that visits every
example of its dataset once, in order: default sampler, ``shuffle=False``, ``drop_last=False``), a
tensor (examples along dim 0), or a tuple/list of tensors of equal length. Scores are indexed by
dataset position, so loaders with another sampler are rejected (see :func:`check_loader`).
"""
from __future__ import annotations

from typing import Any, Iterator, Tuple

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from torch.utils.data import TensorDataset


def _check_batch_size(batch_size, name="batch_size"):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name} must be a positive int, got {batch_size!r}")


def check_loader(loader: DataLoader, name: str = "data") -> None:
    """Rejects a DataLoader that does not yield every example of its dataset once, in order.

    Score column i is example ``loader.dataset[i]``; a random, weighted, subset or custom sampler,
    a custom ``batch_sampler`` or ``drop_last=True`` would silently misplace or drop columns.
    """
    bs = loader.batch_sampler
    if bs is not None and type(bs) is not BatchSampler:
        why = f"a custom batch_sampler ({type(bs).__name__})"
    else:
        sampler = bs.sampler if bs is not None else loader.sampler
        ok = isinstance(sampler, SequentialSampler) or type(sampler).__name__ == \
            "_InfiniteConstantSampler"  # IterableDataset: its own order
        if not ok:
            why = f"a {type(sampler).__name__} sampler" + (
                " (shuffle=True)" if type(sampler).__name__ == "RandomSampler" else "")
        elif bs is not None and bs.drop_last:
            why = "drop_last=True (the last examples would get no scores)"
        else:
            return
    raise ValueError(f"'{name}': the DataLoader has {why}; scores are indexed by position in "
                     "loader.dataset, so the loader must visit every example once, in order. Pass "
                     "the dataset itself (or torch.utils.data.Subset(dataset, indices) to score a "
                     "subset, in the order of indices) with batch_size=..., or a DataLoader with "
                     "the default sampler, shuffle=False and drop_last=False")


def as_loader(data, batch_size: int, *, name: str = "data") -> DataLoader:
    """A sequential DataLoader over ``data`` (see module doc for what is accepted)."""
    _check_batch_size(batch_size)
    if isinstance(data, DataLoader):
        check_loader(data, name)
        return data
    if isinstance(data, torch.Tensor):
        ds = TensorDataset(data)
        return DataLoader(ds, batch_size=batch_size, shuffle=False,
                          collate_fn=lambda items: torch.stack([i[0] for i in items]))
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        lens = {int(t.shape[0]) for t in data}
        if len(lens) != 1:
            raise ValueError(f"'{name}': the tensors of the tuple have different lengths "
                             f"{[int(t.shape[0]) for t in data]}; expected one length")
        return DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=False)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return DataLoader(data, batch_size=batch_size, shuffle=False,
                          sampler=SequentialSampler(data))
    raise TypeError(f"'{name}' must be a Dataset, a sequential DataLoader, a tensor or a tuple "
                    f"of tensors, got {type(data).__name__}")


def num_examples(data, name: str = "data") -> int:
    """Number of examples in ``data`` (any accepted form)."""
    if isinstance(data, DataLoader):
        check_loader(data, name)
        return len(data.dataset)
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return int(data[0].shape[0])
    return len(data)


def batch_len(batch) -> int:
    """Number of examples in a collated batch (first tensor found, dim 0)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        for v in batch.values():
            n = batch_len(v)
            if n >= 0:
                return n
    if isinstance(batch, (tuple, list)):
        for v in batch:
            n = batch_len(v)
            if n >= 0:
                return n
    return -1


def to_device(batch: Any, device: torch.device) -> Any:
    """Moves every tensor of a (nested tuple/list/dict) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)((k, to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _tensors(data):
    """The tensors of a tensor / tuple-of-tensors input (sliced directly), else None."""
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        lens = {int(t.shape[0]) for t in data}
        if len(lens) != 1:
            raise ValueError(f"the tensors of the tuple have different lengths "
                             f"{[int(t.shape[0]) for t in data]}; expected one length")
        return tuple(data)
    return None


def batches(data, batch_size: int, device: torch.device, *, name: str = "data"
            ) -> Iterator[Tuple[int, Any]]:
    """Yields ``(offset, batch)`` with the batch on ``device``; offset = index of its first example.

    Tensors and tuples of tensors are sliced directly (a batch of a tuple is a tuple); other
    inputs go through a sequential DataLoader.
    """
    _check_batch_size(batch_size)
    tensors = _tensors(data)
    if tensors is not None:
        n = num_examples(data)
        for offset in range(0, n, batch_size):
            if isinstance(tensors, torch.Tensor):
                batch = tensors[offset:offset + batch_size]
            else:
                batch = tuple(t[offset:offset + batch_size] for t in tensors)
            yield offset, to_device(batch, device)
        return
    offset = 0
    for batch in as_loader(data, batch_size, name=name):
        b = batch_len(batch)
        if b < 0:
            raise TypeError(f"'{name}': a batch holds no tensor, cannot tell its size")
        yield offset, to_device(batch, device)
        offset += b
