"""The one dispatch table of the kernel layer: which kernel runs, decided here and nowhere else.

For every op it holds

* the **cost model** — FLOPs of each contraction order (:func:`flops`) and the order chosen for
  a device type (:func:`plan`);
* the **CPU rule** — for ``backend="cpu"``, whether the C++ kernel or the torch formulation runs
  (each rule beside the measurements it was fitted to); ``backend="cpp"`` forces the C++ kernel;
* the **backend order** for ``backend=None`` (:data:`ORDER`).

:func:`implementation` combines them into the name of the implementation an op runs:
``"reference"``, ``"materialize"`` (the torch materialised order) or the fused order's
``"torch"``, ``"cpp"``, ``"triton"``, ``"cuda"``. The op modules (``fastinf/ops/<op>.py``) map
those names to functions and never decide themselves.

Dimensions are keywords named as in the ops' docstrings: ``score_factored`` (N, T, Q, S, din,
dout), ``score_dense`` (N, T, Q, din, dout), ``kron_project`` (N, T, din, dout, k_in, k_out),
``ekfac_lambda`` (N, T, din, dout), ``jl_project`` (N, p, k).
"""
from __future__ import annotations

from typing import Dict

import torch

# backend=None: the first usable of these for the inputs' device type (fused kernels first).
# On CUDA, Triton first: on the H200 (bench/results/ops.csv, 2026-11-27, bf16) it was the fastest
# fused kernel of score_dense (T=1 token order, 8192x1x256x2048x2048: Triton 36.0 ms, torch
# 92.0, CUDA C++ 205.0; torch.einsum 27.9) and of kron_project at T=64 (0.20 ms vs CUDA 0.29,
# torch 0.38), but not of every op: CUDA C++ won ekfac_lambda at T=1 (0.27 ms vs Triton 0.99,
# torch 1.54), torch won it at T=64 (0.35 vs CUDA 0.45, Triton 0.56), CUDA C++ won jl_project
# (6.5 ms vs Triton 8.4) and kron_project at T=1 (0.17 ms vs torch 0.21, Triton 0.32).
# score_factored has no H200 row yet (its benchmark never finished a row). A per-op order
# needs _common.default_preference to take the op; until then this one order holds for all.
ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


# --------------------------------------------------------------------------- cost models
def _score_factored_flops(N, T, Q, S, din, dout):
    return {"factored": 2.0 * N * Q * T * S * (din + dout + 1),
            "materialize": 2.0 * dout * din * (N * T + Q * S + N * Q)}


def _score_dense_flops(N, T, Q, din, dout):
    return {"token": 2.0 * N * T * Q * dout * (din + 1),
            "materialize": 2.0 * dout * din * (N * T + N * Q)}


def _kron_project_flops(N, T, din, dout, k_in, k_out):
    return {"project": 2.0 * N * T * (din * k_in + dout * k_out + k_out * k_in),
            "materialize": 2.0 * N * (T * dout * din + dout * din * k_in + dout * k_in * k_out)}


def _ekfac_lambda_flops(N, T, din, dout):
    return {"rotate": 2.0 * N * T * (din * din + dout * dout + dout * din),
            "materialize": 2.0 * N * dout * din * (T + din + dout)}


def _jl_project_flops(N, p, k):
    return {"project": 2.0 * N * p * k}


FLOPS = {"score_factored": _score_factored_flops, "score_dense": _score_dense_flops,
         "kron_project": _kron_project_flops, "ekfac_lambda": _ekfac_lambda_flops,
         "jl_project": _jl_project_flops}

# score_dense: how many times fewer FLOPs the fused token order must need to be chosen, per
# device type. On CPU the materialised order's BLAS GEMMs run at a higher fraction of peak than
# the fused kernels; at T = 1 both orders cost the same FLOPs and the GEMMs won by 1.1-15x
# (bench/results/ops.csv), so near-ties go to "materialize". On GPUs the fused order saves the
# memory traffic of the per-example gradients, so ties go to "token": on the H200 (ops.csv,
# 2026-11-27, bf16) at T = 1 (8192x1x256x2048x2048, equal FLOPs) token ran 36.0 ms (Triton) /
# 92.0 ms (torch) against 300 ms for materialize; where materialize needs far fewer FLOPs it won
# by 58-234x over the torch token order (1024x128x64x1024x1024, 512x256x16x128x64,
# 256x512x64x768x768), so the FLOP rule holds on CUDA as measured.
TOKEN_ADVANTAGE = {"cpu": 2.0}


def flops(op: str, *args, **dims) -> Dict[str, float]:
    """FLOPs of each contraction order of ``op`` for these dimensions (keywords, see the module)."""
    return FLOPS[op](*args, **dims)


def plan(op: str, device_type: str = "cpu", **dims) -> str:
    """The contraction order ``op`` runs for these dimensions on ``device_type`` (``"cpu"``,
    ``"cuda"``): the cheaper by FLOPs, ties to the fused order (first key of :func:`flops`),
    which moves less memory. ``score_dense`` on top weighs device speed and intermediate size:
    ``"token"`` when it needs ``TOKEN_ADVANTAGE``x fewer FLOPs; between that and 2x more FLOPs,
    the order whose intermediate is smaller (``T·Q·dout`` floats per example for ``"token"``,
    ``dout·din`` for ``"materialize"``; measured 2.3x faster on CPU for T=1, Q=64, 512x512).
    """
    f = flops(op, **dims)
    fused, *rest = f
    if not rest:
        return fused
    if op == "score_dense":
        adv = TOKEN_ADVANTAGE.get(device_type, 1.0)
        small = dims["T"] * dims["Q"] < dims["din"]
        ok = adv * f[fused] <= f["materialize"] or (f[fused] <= 2 * f["materialize"] and small)
        return fused if ok else "materialize"
    return fused if f[fused] <= f["materialize"] else "materialize"


# --------------------------------------------------------------------------- CPU rules
def _score_factored_cpp(dtype, T, S, din, dout, **_):
    """C++ iff ``T·S >= 4096`` or (``din + dout <= 768`` and ``T >= S``). The C++ kernel never
    writes the ``[T, S]`` Gram tiles to memory, so it wins where they dominate (many tokens, small
    din+dout); torch's BLAS wins where the two GEMMs dominate (large din+dout, few token pairs)
    and, with the current kernel, when the query side has many more tokens than the examples.

    Measured by ``bench/ops/_cpu_tuning.py`` (1 thread, AMD EPYC Zen 3, AVX2; torch 2.13 MKL;
    ms = min of up to 9 interleaved runs; ratio = C++/torch; * = rule picks C++)::

        layer     N    T    Q    S  din dout   T*S  C++ ms torch ms ratio
        mlp     256    1  256    1   64   64     1    0.38    0.38  0.99 *
        mlp     256    1  256    1  256  256     1    1.28    1.40  0.91 *
        mlp     256    1  256    1  512  512     1    2.08    2.21  0.94
        mlp     256    1  256    1 1025 1024     1    4.67    4.56  1.02
        conv     16  256   16  256   27   16 65536   25.44  338.54  0.08 *
        conv      4 1024    4 1024   27   32 1e+06   81.76  444.89  0.18 *
        conv     16  256   16  256  144   32 65536  171.99  572.24  0.30 *
        conv     16   64   16   64  288   64  4096   17.74   21.17  0.84 *
        conv     16   64   16   64  576  128  4096   44.78   47.94  0.93 *
        conv     64   16   64   16  576   64   256   34.03   36.17  0.94 *
        conv      8  256    8  256  600  128 65536   72.78  103.50  0.70 *
        tfm      64   32   64   32   64   64  1024   14.53   64.28  0.23 *
        tfm      32   32   32   32  512  512  1024   38.05   35.71  1.07
        tfm      32   64   32   64  384  384  4096  173.32  273.58  0.63 *
        tfm      32  128   32  128   64   64 16384   61.48  296.03  0.21 *
        tfm       8  128    8  128  512  512 16384   31.79   31.69  1.00 *
        tfm      64    4   64    4 1024 1024    16    7.94    8.00  0.99
        lowrank 128   64   64    1  256  256    64    7.71   10.01  0.77 *
        lowrank 128   64   64    8  256  256   512   50.56   94.30  0.54 *
        lowrank 128   64   64   32  256  256  2048  205.93  413.96  0.50 *
        lowrank  64  512   64    8   27   64  4096   84.03  448.44  0.19 *
        lowrank 128    1   64   32  512  512    32   20.09   19.39  1.04
        lowrank  32  128   32   32  512  512  4096  226.11  339.79  0.67 *
        lowrank  64    1   64   64  256  256    64   11.74    6.36  1.84
        lowrank  64    1   64   64  512  512    64   23.44   20.08  1.17
    """
    return T * S >= 4096 or (din + dout <= 768 and T >= S)


def _score_dense_cpp(dtype, din, **_):
    """C++ iff ``din < 512``. Measured by ``bench/ops/_cpu_tuning.py`` (1 thread, AMD EPYC Zen 3;
    ratio = C++/torch)::

        N    T   Q   din  dout  C++ ms  torch ms  ratio
        256  1  16    64    64    0.58      0.79   0.74
        256  1  64    27    16    0.32      0.58   0.56
        256  1  16   512   512   66.32     64.90   1.02
        256  1   4  1025  1024   98.90     52.87   1.87
         64  8   8   256   256    7.25     16.98   0.43
         32 64   1   256   256    3.50      6.57   0.53
         32 64   4    64    32    0.53      1.39   0.38
    """
    return din < 512


def _kron_project_cpp(dtype, k_in, k_out, **_):
    """C++ for float32 inputs with ``k_in·k_out <= 1024``; torch for half inputs (upcast either
    way) and at 64x64, where the C++ kernel is ~10-20% slower. Measured, project contraction,
    2-core EPYC Zen 3, 2 threads, median of 9 alternating runs (ms, torch -> C++): N=256 T=1
    1025/1024 k=32x32 0.57 -> 0.52; N=32 T=64 513/512 16x16 0.86 -> 0.75; N=8 T=512 769/768 64x64
    8.6 -> 9.7 (torch kept); T=256 conv-like: N=64 27/16 8x8 0.78 -> 0.35; N=64 144/32 16x16
    1.52 -> 1.44; N=64 288/64 32x32 5.47 -> 5.27; N=32 576/64 32x32 4.48 -> 4.38.
    """
    return dtype == torch.float32 and k_in * k_out <= 1024


def _ekfac_lambda_cpp(dtype, T, **_):
    """C++ iff ``T <= 48``: its register tiles summed example by example (kept tokens only)
    against torch's bmm tiles of the padded examples, 2 threads, Xeon with AVX-512
    (bench/ops/ekfac_lambda.py, 2026-12-07; ms C++ / torch): T=1 N=64 257x256 0.34 / 2.38;
    T=8 N=64 256x256 1.61 / 2.80; T=16 N=32 129x128 0.45 / 0.55; T=48 N=32 (the d=256
    transformer's layers, a third padded) 257x256 3.05 / 4.09, 257x1024 16.3 / 23.2, 1025x256
    17.8 / 26.1; unpadded 688x256 13.7 / 19.2. Torch's GEMMs win from T=64 on (289x64 1.30 /
    1.12, T=128 16x256x256 4.8 / 3.3), where the bmm's K is long enough."""
    return T <= 48


CPU_RULES = {"score_factored": _score_factored_cpp, "score_dense": _score_dense_cpp,
             "kron_project": _kron_project_cpp, "ekfac_lambda": _ekfac_lambda_cpp,
             "jl_project": lambda dtype, **_: True}  # torch regenerates Φ blocks; C++ never stores Φ


def cpu_uses_cpp(op: str, dtype: torch.dtype, **dims) -> bool:
    """The CPU rule: True where ``backend="cpu"`` runs the C++ kernel of ``op``, else torch."""
    return CPU_RULES[op](dtype, **dims)


# --------------------------------------------------------------------------- the choice
def implementation(op: str, backend: str, contraction: str, device_type: str,
                   dtype: torch.dtype, **dims) -> str:
    """What an op runs for a resolved ``backend`` and ``contraction`` (``"auto"`` = :func:`plan`):
    ``"reference"``, ``"materialize"``, or the fused order's ``"torch"``/``"cpp"``/``"triton"``/
    ``"cuda"`` (``"cpu"`` resolved by :func:`cpu_uses_cpp`). The materialised order is torch
    GEMMs on every backend."""
    if backend == "reference":
        return "reference"
    if contraction == "auto":
        contraction = plan(op, device_type, **dims)
    if contraction == "materialize":
        return "materialize"
    if backend == "cpu":
        return "cpp" if cpu_uses_cpp(op, dtype, **dims) else "torch"
    return backend
