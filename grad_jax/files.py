"""Atomic file writes: a reader sees the previous complete file or the new one, never a part."""

from __future__ import annotations

import os
from collections.abc import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` with a temporary name in the folder of `path`, then renames it onto
    `path`; the temporary file is removed if `write` fails (or is interrupted)."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` (UTF-8) through :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
