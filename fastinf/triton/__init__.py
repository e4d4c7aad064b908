"""Triton kernels of fastinf (optional extra ``fastinf[gpu]``); imported lazily by fastinf.ops.

On CPU tensors they run under the Triton interpreter (``TRITON_INTERPRET=1``), as in CI.
Shared helpers (interpreter handling, dot precision, autotuning, alignment, int64 offsets, the
device guard) live in :mod:`fastinf.triton._common`; ``<op>.py`` holds a kernel and its launcher.
"""

from . import _common  # noqa: E402,F401  (applies the interpreter's numpy >= 2.3 fix first)
