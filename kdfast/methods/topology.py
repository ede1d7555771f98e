"""Deprecated: FTD lives in kdfast.methods.ftd and HTD in kdfast.methods.htd (or import them from
kdfast). This alias keeps old imports working and warns once."""

import warnings

from .base import batch_entities
from .ftd import FTD
from .htd import GROUP_LEVELS, HTD, group_means

__all__ = ["FTD", "GROUP_LEVELS", "HTD", "batch_entities", "group_means"]

warnings.warn(
    "kdfast.methods.topology is deprecated; use kdfast.FTD / kdfast.HTD (kdfast.methods.ftd, "
    "kdfast.methods.htd)",
    DeprecationWarning,
    stacklevel=2,
)
