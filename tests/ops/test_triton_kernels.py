"""Helpers shared by the Triton kernels (token blocks, feature alignment, int32-safe strides).

The Triton kernels of each op are tested with every other backend in tests/ops/test_<op>.py.
"""
import pytest
import torch

from fastinf.ops import score_dense_reference, score_factored_reference

from _cases import KERNEL_DTYPES, close_to_max, mask, poison, rand

pytest.importorskip("triton")


def test_token_block():
    from fastinf.triton.score_factored import token_block

    assert token_block(1, 128) == 1
    assert token_block(512, 128) == 128
    assert token_block(1000, 128) == 128          # 1024 rows: within 1/8 of the 1000 optimum
    assert token_block(5, 32) == 1                # 8 would pad 5 tokens to 8
    assert token_block(64, 32) == 32
    for T in range(1, 300):
        bt = token_block(T, 64)
        assert bt & (bt - 1) == 0 and 1 <= bt <= 64


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_align_features_path(dtype):
    """The zero-padded path (default on CUDA) on odd, strided, masked, NaN-poisoned inputs."""
    from fastinf.triton.score_dense import score_dense_triton
    from fastinf.triton.score_factored import score_factored_triton

    A = poison(rand(4, 6, 13, dtype=dtype, noncontig=True), am := mask(4, 6, all_masked=(1,)))
    G = poison(rand(4, 6, 7, dtype=dtype), am)
    V = poison(rand(3, 5, 13, dtype=dtype), vm := mask(3, 5, all_masked=(0,)))
    U = poison(rand(3, 5, 7, dtype=dtype, noncontig=True), vm)
    M = rand(2, 7, 13, dtype=dtype, noncontig=True)
    d = [x.double() for x in (A, G, V, U, M)]
    close_to_max(score_factored_triton(A, G, V, U, am, vm, align=True),
           score_factored_reference(*d[:4], am, vm), dtype)
    close_to_max(score_dense_triton(A, G, M, am, align=True), score_dense_reference(d[0], d[1], d[4], am),
           dtype)


def test_align_features():
    from fastinf.triton.score_factored import align_features

    A, V = torch.randn(2, 3, 16), torch.randn(4, 1, 16)
    a, v = align_features([A, V], [(-1,), (-1,)])
    assert a is A and v is V                      # rows of 16 elements: nothing to do
    M = torch.randn(2, 7, 13)
    (m,) = align_features([M], [(-1, -2)])
    assert m.shape == (2, 16, 16) and torch.equal(m[:, :7, :13], M) and m[:, 7:].eq(0).all()
    h = torch.randn(2, 3, 32).half()[:, :, 4:20]   # 8-byte offset base, stride 32: copied
    (h2,) = align_features([h], [(-1,)])
    assert h2 is not h and h2.shape == h.shape and torch.equal(h2, h)


def test_int32_safe():
    from fastinf.triton.score_factored import int32_safe

    x = torch.randn(4, 3, 5)
    assert int32_safe(x) is x
    y = x.transpose(0, 2)
    assert int32_safe(y) is y                      # small strided views are passed as they are
    big = torch.empty_strided((2, 2, 2), (2**30, 1, 2**30), device="meta")   # span 2**31
    assert int32_safe(big) is not big and int32_safe(big).is_contiguous()
