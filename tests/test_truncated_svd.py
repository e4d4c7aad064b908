"""``ops._common.truncated_svd`` (best rank-r approximation from the Gram on the smaller side)
against the truncation of ``torch.linalg.svd`` in float64, on adversarial shapes and spectra.
The factors are not unique (signs, rotations within repeated singular values), so
reconstructions ``L Rᵀ`` are compared; where the truncation itself is not unique (a repeated
singular value at the cut) its optimality (Eckart–Young) is checked instead. EK-FAC's
``query_rank=r`` against a dense float64 SVD reference is in tests/test_ekfac_cost.py."""
import pytest
import torch

from fastinf.ops._common import truncated_svd


def svd_truncation(X, r):
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return (U[..., :r] * S[..., None, :r]) @ Vh[..., :r, :]


def with_spectrum(B, m, n, s, seed=0):
    """[B, m, n] float64 matrices with singular values ``s`` (padded with zeros), random bases."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(B, m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(B, n, k, generator=g, dtype=torch.float64))[0]
    sv = torch.zeros(k, dtype=torch.float64)
    sv[:len(s)] = torch.as_tensor(s, dtype=torch.float64)[:k]
    return (U * sv) @ V.mT


def close(a, b, tol):
    scale = max(float(b.abs().max()), 1e-300)
    assert float((a.double() - b.double()).abs().max()) <= tol * scale


SHAPES = [(4, 7, 12), (4, 12, 7), (3, 9, 9), (1, 5, 20), (1, 20, 5), (2, 1, 6), (2, 6, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 2, 4])
def test_matches_svd_truncation_float64(shape, r):
    X = torch.randn(*shape, dtype=torch.float64)
    L, R = truncated_svd(X, r)
    k = min(r, *shape[1:])
    assert L.shape == (shape[0], shape[1], k) and R.shape == (shape[0], shape[2], k)
    assert L.dtype == R.dtype == torch.float64
    close(L @ R.mT, svd_truncation(X, r), 1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_input_is_as_accurate_as_its_float64_svd(shape):
    X = torch.randn(*shape)
    L, R = truncated_svd(X, 2)
    assert L.dtype == R.dtype == torch.float32
    close(L @ R.mT, svd_truncation(X, 2), 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("extra", [0, 3])
def test_rank_at_least_min_dim_returns_the_matrix(shape, extra):
    X = torch.randn(*shape)
    L, R = truncated_svd(X, min(shape[1:]) + extra)
    assert torch.equal(L @ R.mT, X)


@pytest.mark.parametrize("shape", [(3, 8, 13), (3, 13, 8)])
@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_rank_deficient(shape, r):
    X = with_spectrum(shape[0], *shape[1:], [3.0, 0.5])            # rank 2
    L, R = truncated_svd(X, r)
    assert torch.isfinite(L).all() and torch.isfinite(R).all()
    close(L @ R.mT, svd_truncation(X, r), 1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 9), (2, 9, 5), (1, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_matrices_give_zero_factors_not_nan(shape, dtype):
    X = torch.zeros(*shape, dtype=dtype)
    L, R = truncated_svd(X, 2)
    assert torch.isfinite(L).all() and torch.isfinite(R).all()
    assert torch.equal(L @ R.mT, X)
    # one zero matrix in a batch leaves the others exact
    Y = torch.randn(*shape, dtype=torch.float64)
    Y[0] = 0
    L, R = truncated_svd(Y, 2)
    close(L @ R.mT, svd_truncation(Y, 2), 1e-12)


@pytest.mark.parametrize("shape", [(3, 10, 16), (3, 16, 10)])
def test_repeated_singular_values_away_from_the_cut(shape):
    X = with_spectrum(shape[0], *shape[1:], [5, 5, 3, 3, 3, 1, 1, 0.5])
    for r in (2, 5, 7):
        close(truncated_svd(X, r)[0] @ truncated_svd(X, r)[1].mT, svd_truncation(X, r), 1e-12)


@pytest.mark.parametrize("shape", [(3, 10, 16), (3, 16, 10)])
def test_repeated_singular_value_at_the_cut_is_an_optimal_truncation(shape):
    s = torch.tensor([5, 3, 3, 3, 1, 0.5], dtype=torch.float64)
    X = with_spectrum(shape[0], *shape[1:], s)
    for r in (2, 3):
        L, R = truncated_svd(X, r)
        M = L @ R.mT
        err2 = torch.linalg.matrix_norm(X - M) ** 2
        close(err2, (s[r:] ** 2).sum().expand(shape[0]), 1e-12)         # Eckart–Young
        assert float(torch.linalg.svdvals(M)[:, r:].max()) <= 1e-12 * float(s[0])   # rank <= r


def test_ill_conditioned_spectrum():
    s = torch.logspace(0, -6, 12, dtype=torch.float64)
    for shape in ((2, 12, 30), (2, 30, 12)):
        X = with_spectrum(*shape, s)
        for r in (3, 8):
            L, R = truncated_svd(X, r)
            close(L @ R.mT, svd_truncation(X, r), 1e-9)


def test_bad_arguments_name_them():
    X = torch.randn(2, 3, 4)
    for r in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="'r' must be a positive int"):
            truncated_svd(X, r)
    with pytest.raises(ValueError, match="'X' must have 3 dimensions"):
        truncated_svd(X[0], 1)
    with pytest.raises(TypeError, match="'X' has dtype"):
        truncated_svd(torch.ones(2, 3, 4, dtype=torch.int64), 1)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 40, 70), (8, 70, 40)])
def test_cuda_matches_cpu_with_either_eigh_device(shape):
    X = torch.randn(*shape)
    ref = svd_truncation(X, 5)
    for where in (None, "cpu", "cuda"):
        L, R = truncated_svd(X.cuda(), 5, eigh_device=where)
        assert L.is_cuda and R.is_cuda
        close((L @ R.mT).cpu(), ref, 1e-5)


# ----------------------------------------------------------------------------- randomized_svd
from fastinf.ops._common import randomized_svd  # noqa: E402


def excess(X, L, R, r):
    """``‖X - L Rᵀ‖ / ‖X - X_r‖ - 1`` per matrix (0: as good as the truncated SVD)."""
    Xd = X.double()
    S = torch.linalg.svdvals(Xd)
    opt = (S[:, r:] ** 2).sum(1).sqrt()
    return torch.linalg.matrix_norm(Xd - L.double() @ R.double().mT) / opt - 1


@pytest.mark.parametrize("wide", [True, False])
def test_randomized_is_exact_when_the_range_is_found(wide):
    """rank(X) <= r + oversample: the range finder spans all of X, the Rayleigh-Ritz step is
    the exact truncation."""
    s = [10.0 / (i + 1) for i in range(20)]                      # rank 20 <= 4 + 24
    X = with_spectrum(3, 128, 150, s, seed=1)
    X = X if wide else X.mT.contiguous()
    L, R = randomized_svd(X, 4)
    assert L.shape == (3, X.shape[1], 4) and R.shape == (3, X.shape[2], 4)
    close(L @ R.mT, svd_truncation(X, 4), 1e-10)


@pytest.mark.parametrize("power,tol", [(None, 1e-6), (1, 1e-6), (2, 1e-9)])
def test_randomized_near_best_on_decaying_and_flat_spectra(power, tol):
    """σ₃₃/σ₈ = 0.08: one power round leaves an excess of ~7e-8, two ~1e-12 (None: the
    default, one round)."""
    kw = {} if power is None else dict(power=power)
    s = [0.9 ** i for i in range(128)]
    X = with_spectrum(2, 128, 160, s, seed=2)
    L, R = randomized_svd(X, 8, **kw)
    assert float(excess(X, L, R, 8).max()) < tol
    G = torch.randn(2, 128, 160, dtype=torch.float64)            # flat: the hard case
    L, R = randomized_svd(G, 8, **kw)
    e = excess(G, L, R, 8)
    assert float(e.min()) >= -1e-12 and float(e.max()) < 0.02   # never better than optimal


def test_randomized_rank_deficient_zero_and_scaled():
    X = with_spectrum(2, 100, 120, [3.0, 2.0, 1.0], seed=3)      # rank 3 < r
    L, R = randomized_svd(X, 8)
    close(L @ R.mT, X, 1e-10)
    assert torch.isfinite(L).all() and torch.isfinite(R).all()
    for dt in (torch.float64, torch.float32):
        Z = torch.zeros(2, 100, 120, dtype=dt)
        L, R = randomized_svd(Z, 8)
        assert torch.isfinite(L).all() and torch.isfinite(R).all()
        assert float((L @ R.mT).abs().max()) == 0.0
        Xs = torch.randn(2, 100, 120, dtype=dt)
        for scale in (1e-30, 1e30):                     # float32 too: no overflow, no NaN
            L, R = randomized_svd(Xs * scale, 8)
            assert torch.isfinite(L).all() and torch.isfinite(R).all()
            assert float(excess(Xs * scale, L, R, 8).max()) < 0.02
    X = with_spectrum(1, 100, 120, [0.8 ** i for i in range(100)], seed=4)
    ref = randomized_svd(X, 5)
    for scale in (1e-30, 1e30):
        L, R = randomized_svd(X * scale, 5)
        close(L @ R.mT / scale, ref[0] @ ref[1].mT, 1e-10)


def test_randomized_factors_do_not_depend_on_the_batch():
    """Ω is drawn from a fixed seed: a matrix gets the same factors alone or in any batch (the
    query batching of query_rank relies on it)."""
    X = torch.randn(5, 96, 130, dtype=torch.float64)
    L, R = randomized_svd(X, 6)
    for i in (0, 3):
        Li, Ri = randomized_svd(X[i:i + 1], 6)
        close(Li @ Ri.mT, (L @ R.mT)[i:i + 1], 1e-12)
        L2, R2 = randomized_svd(X[[i, 4 - i]], 6)
        close(L2[:1] @ R2[:1].mT, (L @ R.mT)[i:i + 1], 1e-12)


def test_randomized_float32_small_and_bad_rank():
    X = torch.randn(2, 96, 140)
    L, R = randomized_svd(X, 4)
    assert L.dtype == R.dtype == torch.float32
    assert float(excess(X, L, R, 4).max()) < 0.02
    Xs = torch.randn(2, 20, 30, dtype=torch.float64)             # r + oversample >= 20: exact
    L, R = randomized_svd(Xs, 3)
    close(L @ R.mT, svd_truncation(Xs, 3), 1e-12)
    with pytest.raises(ValueError, match="'r' must be a positive int"):
        randomized_svd(X, 0)


@pytest.mark.parametrize("wide", [True, False])
@pytest.mark.parametrize("decay", [0.8, 0.6])
def test_randomized_float32_on_ill_conditioned_spectra(wide, decay):
    """float32 input whose range-finder basis has condition (σ₁/σ_kp)² beyond float32's reach
    (0.6**55 ≈ 1e-12): its first orthonormalisation runs in float64, so the factors are as near
    the optimum as float32 rounding allows, L orthonormal to float32 precision, not merely finite.
    A rank-deficient float32 matrix (rank 5 < r + oversample) is reproduced to rounding."""
    s = [decay ** i for i in range(120)]
    X = with_spectrum(2, 120, 200, s, seed=5)
    X = X if wide else X.mT.contiguous()
    L, R = randomized_svd(X.float(), 16)
    # excess measured 2e-8 (0.8) and 3e-4 (0.6: X's own float32 rounding is 9e-5 of the optimum's
    # error); a final basis orthonormalised in float32 alone gave 6e6 and 1e12
    assert float(excess(X, L, R, 16).max()) < 1e-3
    Lo = L if wide else R                      # the factor from the orthonormal basis
    eye = torch.eye(16, dtype=torch.float64)
    assert float((Lo.double().mT @ Lo.double() - eye).abs().max()) < 1e-5
    Xr = with_spectrum(2, 120, 200, [3.0, 2.0, 1.0, 0.5, 0.25], seed=6).float()
    L, R = randomized_svd(Xr, 16)
    assert torch.isfinite(L).all() and torch.isfinite(R).all()
    close(L @ R.mT, Xr, 1e-5)
