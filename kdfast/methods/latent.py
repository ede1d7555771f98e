"""Deprecated: DE lives in kdfast.methods.de, PHR in kdfast.methods.phr and their shared pieces in
kdfast.methods.experts (or import DE, PHR from kdfast). This alias keeps old imports working and
warns once."""

import warnings

from .de import DE
from .experts import (
    AnnealedMethod,
    ExpertBank,
    gumbel_softmax,
    make_linear,
    noise_generator,
    temperature,
    uniform_init_,
)
from .phr import PHR, PersonalizationNet

__all__ = [
    "DE",
    "PHR",
    "AnnealedMethod",
    "ExpertBank",
    "PersonalizationNet",
    "gumbel_softmax",
    "make_linear",
    "noise_generator",
    "temperature",
    "uniform_init_",
]

warnings.warn(
    "kdfast.methods.latent is deprecated; use kdfast.DE / kdfast.PHR (kdfast.methods.de, "
    "kdfast.methods.phr, kdfast.methods.experts)",
    DeprecationWarning,
    stacklevel=2,
)
