"""Benchmark of fastinf.ops.score_factored against torch baselines measured in the same run.

Baselines: ``materialize`` (per-example gradients for all examples, then one GEMM — what a
library without factored kernels does) and ``einsum_factored`` (torch.einsum in the ghost order);
the faster baseline is ``best_torch``. Usage: ``python bench/ops/score_factored.py [--quick]``.
"""
import sys
from pathlib import Path

import torch

# the runner beside this file, also under PYTHONSAFEPATH=1 (bench/gpu_check.sh sets it)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import parse, run  # noqa: E402

from fastinf.ops import score_factored
from fastinf.ops.score_factored import CONTRACTIONS

# (N, T, Q, S, din, dout)
CPU = [
    (1024, 1, 256, 1, 512, 512),    # MLP layer, exact TracIn
    (2048, 1, 64, 1, 256, 10),      # classifier head
    (64, 256, 16, 256, 27, 16),     # first conv layer (3x3x3 patches)
    (64, 64, 16, 64, 144, 32),      # conv layer
    (64, 64, 32, 64, 256, 256),     # sequence layer
    (128, 64, 64, 8, 512, 512),     # EK-FAC rank-8 queries
]
CPU_QUICK = [(256, 1, 64, 1, 128, 128), (32, 64, 8, 64, 27, 16), (32, 32, 8, 4, 128, 128)]
GPU = [
    (8192, 1, 1024, 1, 4096, 4096),   # wide MLP layer, exact TracIn
    (4096, 1, 4096, 1, 1024, 1024),
    (256, 48, 256, 48, 257, 256),     # d=256 transformer layer (+bias column), exact TracIn
    (512, 256, 64, 256, 64, 64),
    (256, 512, 64, 512, 128, 128),
    (1024, 128, 256, 16, 1024, 1024),
    (256, 128, 64, 32, 769, 768),     # d=768 transformer layer, EK-FAC rank-32 queries
    (128, 512, 128, 512, 768, 768),
]
# --quick on a GPU (bench/gpu_check.sh, 40 s cap with Triton autotuning): one MLP and two
# transformer layers
GPU_QUICK = [GPU[1], GPU[2], GPU[6]]


def make(shape, dtype, device):
    N, T, Q, S, din, dout = shape
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype)
    return r(N, T, din), r(N, T, dout), r(Q, S, din), r(Q, S, dout)


def materialize(A, G, V, U):
    D = torch.einsum("nte,ntd->ned", G, A).flatten(1)
    E = torch.einsum("qse,qsd->qed", U, V).flatten(1)
    return D @ E.T


def einsum_factored(A, G, V, U):
    return (torch.einsum("ntd,qsd->ntqs", A, V) * torch.einsum("nte,qse->ntqs", G, U)).sum((1, 3))


def main():
    args = parse(__doc__)
    gpu = args.device.startswith("cuda")
    shapes = (GPU_QUICK if gpu else CPU_QUICK) if args.quick else (GPU if gpu else CPU)
    baselines = {
        "materialize": (materialize, lambda s: 4 * s[5] * s[4] * (s[0] + s[2])),
        "einsum_factored": (einsum_factored, lambda s: 8 * s[0] * s[1] * s[2] * s[3]),
    }
    run("score_factored", shapes, make,
        lambda x, b, c: score_factored(*x, backend=b, contraction=c, check_finite=False),
        baselines, ("N", "T", "Q", "S", "din", "dout"), CONTRACTIONS, args)


if __name__ == "__main__":
    main()
