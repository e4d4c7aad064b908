"""Triton kernels of fastinf (optional extra ``fastinf[gpu]``); imported lazily by fastinf.ops.

On CPU tensors they run under the Triton interpreter (``TRITON_INTERPRET=1``), as in CI.
"""

from . import _interp_compat  # noqa: E402,F401  (interpreter + numpy >= 2.3: see the module)
