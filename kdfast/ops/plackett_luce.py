"""kdfast.plackett_luce_loss (provisional: reference backend only, argument checks to come)."""
from __future__ import annotations

from ..reference.plackett_luce import plackett_luce_loss as _reference


def plackett_luce_loss(ranked, unranked=None, *, log_tail=None, reduction="sum", backend="auto"):
    """Relaxed Plackett-Luce loss; see kdfast.reference.plackett_luce for the math."""
    return _reference(ranked, unranked, log_tail, reduction)
