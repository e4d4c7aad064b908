"""Issue 12: bad or unusual input gets a clear error naming the argument, layer or path and
what to do, never NaN scores or a raw library error."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinf

from _models import ce_loss


def mlp_data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def mlp(seed=0, act=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh() if act else nn.Identity(), nn.Linear(8, 3))


# --------------------------------------------------------------------------- item 5: damping
@pytest.mark.parametrize("damping", [float("inf"), float("-inf"), float("nan"), -0.1, True, "1"])
def test_non_finite_or_negative_damping_is_rejected(damping):
    with pytest.raises(ValueError, match=r"damping must be None \(heuristic\) or a finite float "
                                         r">= 0, got"):
        fastinf.EKFAC(mlp(), ce_loss, damping=damping, progress=False)


# --------------------------------------------------------------------------- item 12: loss name
def test_scalar_loss_names_the_argument_given():
    train = mlp_data()

    def mean_loss(m, b):
        return ce_loss(m, b).mean()
    with pytest.raises(ValueError, match=r"^loss_fn returned a scalar"):
        fastinf.EKFAC(mlp(), mean_loss, progress=False).fit(train)
    with pytest.raises(ValueError, match=r"^fisher_loss_fn returned a scalar"):
        fastinf.EKFAC(mlp(), ce_loss, fisher_loss_fn=mean_loss, progress=False).fit(train)
