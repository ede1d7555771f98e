"""Progress bars for kdfast's long steps (full-ranking evaluation, a teacher's top-N lists, the
scorer top-k): one switch for the whole library, and a rule for what counts as long.

set_enabled(None) (the default) shows a bar only for long steps: at least LONG_PAIRS scored pairs
(some seconds on a CPU), or LONG_LINES lines of a data file; True shows every bar; False none
(kdfast distill --no-progress). Bars go to stderr through tqdm and vanish when done (leave=False).
"""

from __future__ import annotations

LONG_PAIRS = 1e9
LONG_LINES = 1e6  # lines of a data file parsed in Python (some seconds)
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


def lines(items, path, *, start: int = 1):
    """enumerate(items, start) with a bar when the file is long (LONG_LINES lines)."""
    from tqdm.auto import tqdm

    on = _enabled if _enabled is not None else len(items) >= LONG_LINES
    it = enumerate(items, start=start)
    if not on:
        return it
    name = getattr(path, "name", str(path))
    return tqdm(it, total=len(items), desc=f"reading {name}", unit="line", leave=False)
