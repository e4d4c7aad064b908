"""Test configuration: Triton runs under its interpreter on CPU when no GPU is visible."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created (fastinf.triton imports lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:   # the marker, not a path named gpu
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
