"""Tuning script (not a test): fused C++ kernels vs the best torch formulation on the CPU.

Measures, over a grid of realistic layer shapes, the compiled ``score_factored`` kernel against
``factored_torch`` and the compiled ``score_dense`` kernel against ``token_torch``, and prints
the time ratio C++/torch next to the quantities the CPU rules of the dispatch table
(``fastinf/ops/_dispatch.py``, ``CPU_RULES``) look at. Keep it small: it is meant to run in well under a minute.

    PYTHONPATH=. python bench/ops/_cpu_tuning.py [--only factored|dense] [--threads 1]

Runs single-threaded by default: on a shared machine multi-threaded timings are dominated by
descheduled threads; the C++/torch ratio is a per-core property (both parallelise over tiles).
"""
from __future__ import annotations

import argparse
import time

import torch

from fastinf.ops import score_dense, score_factored


def _sf(backend):
    return lambda *x: score_factored(*x, backend=backend, contraction="factored", check_finite=False)


def _sd(backend):
    return lambda *x: score_dense(*x, backend=backend, contraction="token", check_finite=False)


def best_times(fa, fb, *args, budget=1.5, reps=9):
    """Min-of-reps wall time of ``fa(*args)`` and ``fb(*args)``, interleaved so that both see the
    same machine load (the min is robust to other processes sharing the cores)."""
    fa(*args), fb(*args)  # warm-up (allocations, thread pool)
    ta = tb = float("inf")
    t_end = time.perf_counter() + budget
    for _ in range(reps):
        t0 = time.perf_counter()
        fa(*args)
        t1 = time.perf_counter()
        fb(*args)
        t2 = time.perf_counter()
        ta, tb = min(ta, t1 - t0), min(tb, t2 - t1)
        if t2 > t_end:
            break
    return ta, tb


# (label, N, T, Q, S, din, dout)
FACTORED = [
    ("mlp", 256, 1, 256, 1, 64, 64),
    ("mlp", 256, 1, 256, 1, 512, 512),
    ("mlp", 256, 1, 256, 1, 1025, 1024),
    ("conv", 16, 256, 16, 256, 27, 16),
    ("conv", 4, 1024, 4, 1024, 27, 32),
    ("conv", 16, 256, 16, 256, 144, 32),
    ("conv", 16, 64, 16, 64, 288, 64),
    ("conv", 16, 64, 16, 64, 576, 128),
    ("conv", 64, 16, 64, 16, 576, 64),
    ("conv", 8, 256, 8, 256, 600, 128),
    ("tfm", 64, 32, 64, 32, 64, 64),
    ("tfm", 32, 32, 32, 32, 512, 512),
    ("tfm", 32, 128, 32, 128, 64, 64),
    ("tfm", 8, 128, 8, 128, 512, 512),
    ("lowrank", 128, 64, 64, 1, 256, 256),
    ("lowrank", 128, 64, 64, 8, 256, 256),
    ("lowrank", 128, 64, 64, 32, 256, 256),
    ("lowrank", 64, 512, 64, 8, 27, 64),
    ("lowrank", 128, 1, 64, 32, 512, 512),
    ("lowrank", 32, 128, 32, 32, 512, 512),
    ("lowrank", 64, 1, 64, 64, 256, 256),
    ("lowrank", 64, 1, 64, 64, 512, 512),
    ("mlp", 256, 1, 256, 1, 256, 256),
    ("tfm", 32, 64, 32, 64, 384, 384),
    ("tfm", 64, 4, 64, 4, 1024, 1024),
]

# (label, N, T, Q, din, dout)
DENSE = [
    ("mlp", 256, 1, 16, 64, 64),
    ("mlp", 256, 1, 64, 27, 16),
    ("mlp", 256, 1, 16, 512, 512),
    ("mlp", 256, 1, 4, 1025, 1024),
    ("tok", 64, 8, 8, 256, 256),
    ("tok", 32, 64, 1, 256, 256),
    ("tok", 32, 64, 4, 64, 32),
]


def run_factored():
    print("score_factored: C++ fused vs factored_torch (CPU, float32, "
          f"{torch.get_num_threads()} threads)")
    print(f"{'layer':8} {'N':>4} {'T':>5} {'Q':>4} {'S':>5} {'din':>5} {'dout':>5} "
          f"{'T*S':>7} {'din+dout':>8} {'C++ ms':>9} {'torch ms':>9} {'ratio':>6}")
    for label, N, T, Q, S, din, dout in FACTORED:
        A, G = torch.randn(N, T, din), torch.randn(N, T, dout)
        V, U = torch.randn(Q, S, din), torch.randn(Q, S, dout)
        a, b = best_times(_sf("cpp"), _sf("torch"), A, G, V, U)
        print(f"{label:8} {N:>4} {T:>5} {Q:>4} {S:>5} {din:>5} {dout:>5} {T * S:>7} "
              f"{din + dout:>8} {a * 1e3:>9.2f} {b * 1e3:>9.2f} {a / b:>6.2f}", flush=True)


def run_dense():
    print("score_dense (token order): C++ fused vs token_torch (CPU, float32)")
    print(f"{'layer':8} {'N':>4} {'T':>5} {'Q':>4} {'din':>5} {'dout':>5} "
          f"{'C++ ms':>9} {'torch ms':>9} {'ratio':>6}")
    for label, N, T, Q, din, dout in DENSE:
        A, G = torch.randn(N, T, din), torch.randn(N, T, dout)
        M = torch.randn(Q, dout, din)
        a, b = best_times(_sd("cpp"), _sd("torch"), A, G, M)
        print(f"{label:8} {N:>4} {T:>5} {Q:>4} {din:>5} {dout:>5} "
              f"{a * 1e3:>9.2f} {b * 1e3:>9.2f} {a / b:>6.2f}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=("factored", "dense"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # also sets the OpenMP threads of fastinf._C
    if args.only != "dense":
        run_factored()
    if args.only != "factored":
        run_dense()
