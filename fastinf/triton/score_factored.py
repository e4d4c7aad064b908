"""Triton kernel of ``score_factored`` (the fused "ghost" contraction).

Formula::

    S[n, q] = Σ_t Σ_s (A[n,t]·V[q,s]) · (G[n,t]·U[q,s])        (float32 accumulation)

with ``A [N, T, din]``, ``G [N, T, dout]``, ``V [Q, S, din]``, ``U [Q, S, dout]`` and optional
token masks ``a_mask [N, T]`` / ``v_mask [Q, S]`` (False = the token contributes nothing, even if
its values are NaN/Inf).

Tiling
------
The ``(n, t)`` rows of A/G and the ``(q, s)`` columns of V/U are mapped to tiles so that a tile
never straddles examples:

* a **row tile** of ``BLOCK_R`` rows holds ``BN = BLOCK_R // BT`` examples × ``BT`` tokens
  (row ``r`` is example ``n0 + r // BT``, token ``t0 + r % BT``); ``BT`` is a power of two
  chosen per call from T (:func:`~fastinf.triton._common.token_block`) to keep token padding small: ``BT = 1`` for
  MLP layers (T = 1, the row tile is ``BLOCK_R`` examples: two GEMMs + a Hadamard product),
  ``BT = BLOCK_R`` for long sequences (one example per tile, looping over its tokens);
* a **column tile** of ``BLOCK_C`` columns likewise holds ``BQ = BLOCK_C // BS`` queries ×
  ``BS`` tokens.

One program owns the output tile ``out[n0:n0+BN, q0:q0+BQ]`` and loops over the token blocks
``t0`` (step BT) and ``s0`` (step BS). For each pair it computes the two Gram tiles
``Ka = A_tile · V_tileᵀ`` (K-loop over din) and ``Kg = G_tile · U_tileᵀ`` (K-loop over dout) with
``tl.dot`` on inputs in their own dtype (tensor cores on GPU) and fp32 accumulators, takes
``P = Ka ∘ Kg`` with masked / out-of-range rows and columns replaced by 0 (``where``, a select:
NaN/Inf in masked tokens never leak), and segment-sums it into the accumulator:
``reshape(P, [BN, BT, BC]).sum(1)`` then ``reshape(·, [BN, BQ, BS]).sum(2)``. The
``[N, T, Q, S]`` intermediate never exists; each output element is written once by one program
(plain stores, no atomics: deterministic, and safe to re-run while autotuning).
Out-of-range rows/columns are clamped to valid ones, so operand loads carry only the K mask.

Memory layout: any strides are accepted (example/query offsets in int64, token/feature offsets
in int32, see :func:`~fastinf.triton._common.int32_safe`). On CUDA, din/dout are zero-padded to multiples of 16 when they
are not (an odd din from a bias column is the common case) or when a tensor is not aligned
(:func:`~fastinf.triton._common.align_features`): triton only vectorises the loads (and pipelines them with cp.async)
when it can prove 16-divisible strides and K bounds.

Under the interpreter bf16 dot inputs are upcast to fp32 (:func:`~fastinf.triton._common.upcast_dot`); on GPU they are
not. fp32 inputs follow torch's matmul precision: ``torch.get_float32_matmul_precision() ==
"highest"`` (torch's default) uses exact fp32 dots (``input_precision="ieee"``), "high"/"medium"
allow TF32, as torch.matmul does.

On GPU the block sizes are autotuned (key: din, dout and power-of-two buckets of T and S, plus
the dtype); ``FASTINF_TRITON_AUTOTUNE=0`` skips tuning and uses the first config. Under the
interpreter (``TRITON_INTERPRET=1``, CPU tensors) a single small config is used.
"""
import torch
import triton
import triton.language as tl

from ._common import (align_features, configs, device_guard, grid_1d, input_precision,
                      int32_safe, mask_arg, pow2_bucket, static_sizes, tile_ids, token_block, upcast_dot)


# --------------------------------------------------------------------------- kernel
def _configs():
    # Two fp32 accumulator tiles are live at once (Ka while Kg accumulates), so tiles stay at
    # 64x64..128x64; ptxas (sm_90, triton 3.6) reported spills for 128x128 and BLOCK_K=128.
    # The first (untuned default) had the fewest registers: 128-180, no spills, any dtype.
    return configs(triton.Config({"BLOCK_R": 32, "BLOCK_C": 32, "BLOCK_K": 32}, num_warps=4), [
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ])


@triton.autotune(configs=_configs(), key=["din", "dout", "T_KEY", "S_KEY"])
@triton.heuristics({
    "BT": lambda a: token_block(a["T"], a["BLOCK_R"]),
    "BS": lambda a: token_block(a["S"], a["BLOCK_C"]),
})
@triton.jit
def _score_factored_kernel(
    A, G, V, U, AM, VM, OUT,
    N, T, Q, S, din, dout,
    sAn, sAt, sAk, sGn, sGt, sGk,
    sVq, sVs, sVk, sUq, sUs, sUk,
    sAMn, sAMt, sVMq, sVMs, sOn, sOq,
    T_KEY, S_KEY,  # autotune buckets only
    T_C: tl.constexpr, S_C: tl.constexpr, DIN_C: tl.constexpr, DOUT_C: tl.constexpr,
    HAS_AM: tl.constexpr, HAS_VM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, GROUP: tl.constexpr = 8,
):
    BN: tl.constexpr = BLOCK_R // BT
    BQ: tl.constexpr = BLOCK_C // BS
    num_r = tl.cdiv(N, BN)
    num_c = tl.cdiv(Q, BQ)
    pid_r, pid_c = tile_ids(tl.program_id(0), num_r, num_c, GROUP)

    rr = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_C)
    kk = tl.arange(0, BLOCK_K)
    n = pid_r * BN + rr // BT                     # [BLOCK_R] example of each row
    q = pid_c * BQ + cc // BS                     # [BLOCK_C] query of each column
    n_ok = n < N
    q_ok = q < Q
    n64 = n.to(tl.int64)
    q64 = q.to(tl.int64)

    # Out-of-range rows/columns are clamped to a valid example/token so that the operand loads
    # need only the K mask; they (and masked tokens, even NaN ones) are dropped by the where on P.
    n_c = tl.minimum(n, N - 1).to(tl.int64)
    q_c = tl.minimum(q, Q - 1).to(tl.int64)

    acc = tl.zeros((BN, BQ), dtype=tl.float32)
    for t0 in range(0, T_C if T_C > 0 else T, BT):
        t = t0 + rr % BT
        r_ok = n_ok & (t < T)
        if HAS_AM:
            am = tl.load(AM + n64 * sAMn + t * sAMt, mask=r_ok, other=0)
            r_ok = r_ok & (am != 0)
        t_c = tl.minimum(t, T - 1)
        a_row = A + n_c * sAn + t_c * sAt         # [BLOCK_R] row pointers
        g_row = G + n_c * sGn + t_c * sGt
        for s0 in range(0, S_C if S_C > 0 else S, BS):
            s = s0 + cc % BS
            c_ok = q_ok & (s < S)
            if HAS_VM:
                vm = tl.load(VM + q64 * sVMq + s * sVMs, mask=c_ok, other=0)
                c_ok = c_ok & (vm != 0)
            s_c = tl.minimum(s, S - 1)
            v_col = V + q_c * sVq + s_c * sVs     # [BLOCK_C] column pointers

            ka = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for k0 in range(0, DIN_C if DIN_C > 0 else din, BLOCK_K):
                k = k0 + kk
                k_ok = k < din
                a = tl.load(a_row[:, None] + k[None, :] * sAk, mask=k_ok[None, :], other=0.0)
                v = tl.load(v_col[None, :] + k[:, None] * sVk, mask=k_ok[:, None], other=0.0)
                if UPCAST:
                    a, v = a.to(tl.float32), v.to(tl.float32)
                ka = tl.dot(a, v, ka, input_precision=PRECISION)
            u_col = U + q_c * sUq + s_c * sUs
            kg = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for k0 in range(0, DOUT_C if DOUT_C > 0 else dout, BLOCK_K):
                k = k0 + kk
                k_ok = k < dout
                g = tl.load(g_row[:, None] + k[None, :] * sGk, mask=k_ok[None, :], other=0.0)
                u = tl.load(u_col[None, :] + k[:, None] * sUk, mask=k_ok[:, None], other=0.0)
                if UPCAST:
                    g, u = g.to(tl.float32), u.to(tl.float32)
                kg = tl.dot(g, u, kg, input_precision=PRECISION)

            # select, not multiply: NaN/Inf of masked or clamped rows/columns never leak
            p = tl.where(r_ok[:, None] & c_ok[None, :], ka * kg, 0.0)
            p = tl.sum(tl.reshape(p, (BN, BT, BLOCK_C)), axis=1)      # over the tokens t
            acc += tl.sum(tl.reshape(p, (BN, BQ, BS)), axis=2)        # over the tokens s

    on = pid_r * BN + tl.arange(0, BN)
    oq = pid_c * BQ + tl.arange(0, BQ)
    o_ptr = OUT + on.to(tl.int64)[:, None] * sOn + oq.to(tl.int64)[None, :] * sOq
    tl.store(o_ptr, acc, mask=(on < N)[:, None] & (oq < Q)[None, :])


# --------------------------------------------------------------------------- launcher
def score_factored_triton(A, G, V, U, a_mask=None, v_mask=None, align=None) -> torch.Tensor:
    """``S[n,q] = Σ_{t,s} (A[n,t]·V[q,s]) (G[n,t]·U[q,s])`` by the fused Triton kernel.

    A ``[N, T, din]``, G ``[N, T, dout]``, V ``[Q, S, din]``, U ``[Q, S, dout]`` (one float
    dtype, one device, any strides), a_mask ``[N, T]`` / v_mask ``[Q, S]`` bool or None.
    Returns float32 ``[N, Q]``. ``align`` (default: on CUDA) pads din/dout with zeros to a
    multiple of 16 first (:func:`~fastinf.triton._common.align_features`).
    """
    N, T, din = A.shape
    Q, S, dout = U.shape
    out = torch.empty(N, Q, dtype=torch.float32, device=A.device)
    if N == 0 or Q == 0:
        return out
    if T == 0 or S == 0:
        return out.zero_()
    if A.is_cuda if align is None else align:
        A, V = align_features([A, V], [(-1,), (-1,)])
        G, U = align_features([G, U], [(-1,), (-1,)])
        din, dout = A.shape[-1], G.shape[-1]
    A, G, V, U = (int32_safe(x) for x in (A, G, V, U))
    am, sAMn, sAMt, has_am = mask_arg(a_mask, out)
    vm, sVMq, sVMs, has_vm = mask_arg(v_mask, out)

    def grid(meta):
        bn = meta["BLOCK_R"] // meta["BT"]
        bq = meta["BLOCK_C"] // meta["BS"]
        return grid_1d("score_factored", triton.cdiv(N, bn) * triton.cdiv(Q, bq))

    with device_guard(A):
        _score_factored_kernel[grid](
            A, G, V, U, am, vm, out,
            N, T, Q, S, din, dout,
            *A.stride(), *G.stride(), *V.stride(), *U.stride(),
            sAMn, sAMt, sVMq, sVMs, *out.stride(),
            pow2_bucket(T), pow2_bucket(S), *static_sizes(T, S, din, dout),
            HAS_AM=has_am, HAS_VM=has_vm, PRECISION=input_precision(A.dtype),
            UPCAST=upcast_dot(A.dtype),
        )
    return out
