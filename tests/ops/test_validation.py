"""Bad input to the ops raises clear errors naming the argument; nothing crashes."""
import pytest
import torch

from fastinf.ops import score_dense, score_factored


def f(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def test_wrong_rank_names_argument():
    with pytest.raises(ValueError, match=r"'A' must have 3 dimensions \[N, T, din\], got shape \(4, 5\)"):
        score_factored(f(4, 5), f(4, 1, 3), f(2, 1, 5), f(2, 1, 3))
    with pytest.raises(ValueError, match=r"'M' must have 3 dimensions"):
        score_dense(f(4, 1, 5), f(4, 1, 3), f(3, 5))


def test_mismatched_sizes_name_both_shapes():
    with pytest.raises(ValueError, match=r"'V' has shape \(2, 1, 6\); expected \[Q, S, din\] with din=5"):
        score_factored(f(4, 1, 5), f(4, 1, 3), f(2, 1, 6), f(2, 1, 3))
    with pytest.raises(ValueError, match=r"'G' has shape \(3, 1, 3\); expected \[N, T, dout\] with N=4"):
        score_factored(f(4, 1, 5), f(3, 1, 3), f(2, 1, 5), f(2, 1, 3))
    with pytest.raises(ValueError, match=r"'U' has shape .* with S=2"):
        score_factored(f(4, 1, 5), f(4, 1, 3), f(2, 2, 5), f(2, 1, 3))
    with pytest.raises(ValueError, match=r"'M' has shape \(2, 4, 5\); expected \[Q, dout, din\] with dout=3"):
        score_dense(f(4, 1, 5), f(4, 1, 3), f(2, 4, 5))


def test_dtype_errors():
    with pytest.raises(TypeError, match=r"'A' has dtype torch.int64"):
        score_factored(torch.ones(2, 1, 3, dtype=torch.long), f(2, 1, 3), f(2, 1, 3), f(2, 1, 3))
    with pytest.raises(TypeError, match=r"'A' and 'G' have different dtypes"):
        score_dense(f(2, 1, 3), f(2, 1, 3, dtype=torch.float16), f(1, 3, 3))
    with pytest.raises(TypeError, match=r"float64 inputs are supported by backend='reference' only"):
        score_dense(*(f(2, 1, 3, dtype=torch.float64),) * 2, f(1, 3, 3, dtype=torch.float64), backend="cpu")
    with pytest.raises(TypeError, match=r"'V' must be a torch.Tensor"):
        score_factored(f(2, 1, 3), f(2, 1, 3), [[1.0]], f(2, 1, 3))


def test_mask_errors():
    with pytest.raises(ValueError, match=r"'a_mask' has shape \(4, 2\); expected \(4, 1\)"):
        score_factored(f(4, 1, 5), f(4, 1, 3), f(2, 1, 5), f(2, 1, 3), a_mask=torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"'v_mask' must have dtype torch.bool"):
        score_factored(f(4, 1, 5), f(4, 1, 3), f(2, 1, 5), f(2, 1, 3), v_mask=torch.ones(2, 1))


def test_unknown_backend_and_contraction():
    args = (f(2, 1, 3), f(2, 1, 3), f(2, 1, 3), f(2, 1, 3))
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; expected one of reference, torch, cpu, cpp, triton, cuda"):
        score_factored(*args, backend="gpu")
    with pytest.raises(ValueError, match=r"unknown contraction 'ghost'"):
        score_factored(*args, contraction="ghost")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"backend 'cuda' is not usable for inputs on cpu"):
            score_factored(*args, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_nonfinite_input_is_reported_with_argument_and_example(backend):
    A, G, V, U = f(5, 2, 4), f(5, 2, 3), f(3, 2, 4), f(3, 2, 3)
    G[3, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"argument 'G' has non-finite values .* first at index 3"):
        score_factored(A, G, V, U, backend=backend)
    M = f(3, 3, 4)
    M[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"argument 'M' has non-finite values .* first at index 1"):
        score_dense(f(5, 2, 4), f(5, 2, 3), M, backend=backend)
    # Opting out returns the non-finite scores instead.
    out = score_factored(A, G, V, U, backend=backend, check_finite=False)
    assert not torch.isfinite(out).all()
