"""Compatibility of the Triton interpreter (``TRITON_INTERPRET=1``) with numpy >= 2.3.

The interpreter holds kernel scalars as 1-element arrays and converts them with
``int(array)`` when they bound a ``range`` loop; numpy 2.3+ rejects that for ndim > 0 arrays
("only 0-dimensional arrays can be converted to Python scalars"), so every kernel with a
runtime loop bound fails. This wraps the interpreter's tensor patching so that ``__index__``
reads the single element. Only applied when the interpreter is on; compiled GPU runs are untouched.
"""
from __future__ import annotations

import os


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        from triton.runtime import interpreter as _i
    except Exception:  # pragma: no cover
        return
    orig = getattr(_i, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_fastinf_compat", False):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._fastinf_compat = True
    _i._patch_lang_tensor = _patch_lang_tensor


apply()
