"""Bridges to other influence libraries: fastinf as a speedup backend for their users.

* :mod:`fastinf.integrations.kronfluence`: an :class:`fastinf.EKFAC` from a Kronfluence ``Task``
  (``from_task``), or from factors Kronfluence has already fitted (``load_factors``);
* :mod:`fastinf.integrations.trak`: a TRAK projector (``Projector``) over ``fastinf.ops.jl_project``.

Neither needs the peer library installed (duck typing; the factor files are read as safetensors).
"""
from . import kronfluence, trak

__all__ = ["kronfluence", "trak"]
