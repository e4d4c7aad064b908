"""Triton kernels of fastinf (optional extra ``fastinf[gpu]``); imported lazily by fastinf.ops.

On CPU tensors they run under the Triton interpreter (``TRITON_INTERPRET=1``), as in CI.
"""
