"""Deprecated: RRD lives in kdfast.methods.rrd and IRRRD in kdfast.methods.ir_rrd (or import them
from kdfast). This alias keeps old imports working and warns once."""

import warnings

from .ir_rrd import IRRRD
from .rrd import RRD

__all__ = ["IRRRD", "RRD"]

warnings.warn(
    "kdfast.methods.ranking is deprecated; use kdfast.RRD / kdfast.IRRRD "
    "(kdfast.methods.rrd, kdfast.methods.ir_rrd)",
    DeprecationWarning,
    stacklevel=2,
)
