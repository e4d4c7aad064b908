"""Benchmark of fastinf.ops.score_dense against torch baselines measured in the same run.

Baselines: ``materialize`` (per-example gradients for all examples, then one GEMM with the
flattened M) and ``einsum_token`` (torch.einsum through the [N, T, Q, dout] intermediate); the
faster is ``best_torch``. Usage: ``python bench/ops/score_dense.py [--quick]``.
"""
import sys
from pathlib import Path

import torch

# the runner beside this file, also under PYTHONSAFEPATH=1 (bench/gpu_check.sh sets it)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import parse, run  # noqa: E402

from fastinf.ops import score_dense
from fastinf.ops.score_dense import CONTRACTIONS

# (N, T, Q, din, dout)
CPU = [
    (1024, 1, 64, 512, 512),     # EK-FAC full-rank queries on an MLP layer
    (2048, 1, 256, 256, 10),     # classifier head, many queries
    (64, 256, 8, 27, 16),        # first conv layer
    (64, 64, 16, 256, 256),      # sequence layer
]
CPU_QUICK = [(256, 1, 16, 128, 128), (32, 64, 4, 27, 16)]
GPU = [
    (8192, 1, 256, 2048, 2048),
    (4096, 1, 64, 1024, 1024),      # MLP layer, EK-FAC full-rank queries
    (1024, 128, 64, 1024, 1024),
    (512, 256, 16, 128, 64),
    (256, 48, 16, 257, 256),        # d=256 transformer layer (+bias column)
    (256, 128, 16, 769, 768),       # d=768 transformer layer
    (256, 512, 64, 768, 768),
]
GPU_QUICK = [GPU[1], GPU[4], GPU[5]]  # --quick on a GPU (bench/gpu_check.sh, 30 s cap)


def make(shape, dtype, device):
    N, T, Q, din, dout = shape
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype)
    return r(N, T, din), r(N, T, dout), r(Q, dout, din)


def materialize(A, G, M):
    return torch.einsum("nte,ntd->ned", G, A).flatten(1) @ M.flatten(1).T


def einsum_token(A, G, M):
    return torch.einsum("ntqe,nte->nq", torch.einsum("ntd,qed->ntqe", A, M), G)


def main():
    args = parse(__doc__)
    gpu = args.device.startswith("cuda")
    shapes = (GPU_QUICK if gpu else CPU_QUICK) if args.quick else (GPU if gpu else CPU)
    baselines = {
        "materialize": (materialize, lambda s: 4 * s[0] * s[3] * s[4]),
        "einsum_token": (einsum_token, lambda s: 4 * s[0] * s[1] * s[2] * s[4]),
    }
    run("score_dense", shapes, make,
        lambda x, b, c: score_dense(*x, backend=b, contraction=c, check_finite=False),
        baselines, ("N", "T", "Q", "din", "dout"), CONTRACTIONS, args)


if __name__ == "__main__":
    main()
