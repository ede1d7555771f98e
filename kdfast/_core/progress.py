"""Progress bars for kdfast's long steps (full-ranking evaluation, a teacher's top-N lists, the
scorer top-k): one switch for the whole library, and a rule for what counts as long.

set_enabled(None) (the default) shows a bar only for steps of at least LONG_PAIRS scored pairs
(some seconds on a CPU); True shows every bar; False none (kdfast distill --no-progress). Bars go
to stderr through tqdm and vanish when done (leave=False).
"""

from __future__ import annotations

LONG_PAIRS = 1e9
_enabled = None


def set_enabled(on) -> None:
    """None: automatic (long steps only); True: always; False: never."""
    global _enabled
    if on not in (None, True, False):
        raise ValueError(f"progress must be None, True or False, got {on!r}")
    _enabled = on


def enabled(pairs: float) -> bool:
    """Whether a step scoring `pairs` query-key pairs shows a bar."""
    return _enabled if _enabled is not None else pairs >= LONG_PAIRS


def bar(total: int, desc: str, *, pairs: float, unit: str = "row"):
    """A tqdm bar over `total` units (update(n) / close()), or one that does nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled(pairs))
