"""Files written whole or not at all."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call write(tmp) on a temporary file next to `path` (a name no other writer uses), then rename
    it over `path`: a reader sees the old file or the new one, never a half-written one, and two
    writers never share a temporary file. Creates the folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
