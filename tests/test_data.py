"""Data plumbing: which DataLoaders are accepted (scores are indexed by dataset position)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, Sampler, SequentialSampler,
                              SubsetRandomSampler, TensorDataset, WeightedRandomSampler)

import fastinf
from fastinf.data import as_loader, batches, num_examples


def _ds(n=10):
    return TensorDataset(torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,)))


class _Reversed(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


class _PairBatches(Sampler):
    """A custom batch sampler (sequential, but torch cannot tell)."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter([[i, i + 1] for i in range(0, self.n, 2)])

    def __len__(self):
        return self.n // 2


def _rejected_loaders():
    ds = _ds()
    return {
        "SubsetRandomSampler": DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(range(6))),
        "WeightedRandomSampler": DataLoader(ds, batch_size=4,
                                            sampler=WeightedRandomSampler(torch.ones(10), 10)),
        "_Reversed": DataLoader(ds, batch_size=4, sampler=_Reversed(10)),
        "_PairBatches": DataLoader(ds, batch_sampler=_PairBatches(10)),
        "drop_last": DataLoader(ds, batch_size=4, drop_last=True),
        "RandomSampler": DataLoader(ds, batch_size=4, shuffle=True),
    }


@pytest.mark.parametrize("needle", list(_rejected_loaders()))
def test_non_sequential_loader_is_rejected_naming_why(needle):
    loader = _rejected_loaders()[needle]
    for fn in (lambda: as_loader(loader, 4, name="train"), lambda: num_examples(loader),
               lambda: list(batches(loader, 4, torch.device("cpu"), name="train"))):
        with pytest.raises(ValueError, match=needle) as ei:
            fn()
    msg = str(ei.value)
    assert "'train'" in msg and "Subset" in msg, msg


@pytest.mark.parametrize("needle", ["SubsetRandomSampler", "drop_last"])
def test_methods_reject_such_loaders(needle):
    model = nn.Linear(3, 2).double()
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    tr = fastinf.TracIn(model, loss, progress=False)
    loader = _rejected_loaders()[needle]
    with pytest.raises(ValueError, match=needle):
        tr.pairwise_scores(_ds(3)[:], loader, batch_size=4)


@pytest.mark.parametrize("kind", ["batch_size", "batch_sampler", "Subset"])
def test_sequential_loaders_are_accepted_and_ordered(kind):
    ds = _ds(10)
    model = nn.Linear(3, 2).double()
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    tr = fastinf.TracIn(model, loss, progress=False)
    q = ds[:3]
    ref = tr.pairwise_scores(q, ds[:], batch_size=4)
    loader = {"batch_size": DataLoader(ds, batch_size=4),
              "batch_sampler": DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 3,
                                                                         False)),
              "Subset": DataLoader(torch.utils.data.Subset(ds, range(10)), batch_size=4)}[kind]
    assert num_examples(loader) == 10
    assert torch.cat([b[0] for _, b in batches(loader, 4, torch.device("cpu"))]).equal(ds.tensors[0])
    torch.testing.assert_close(tr.pairwise_scores(q, loader, batch_size=4), ref)
