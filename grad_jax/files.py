"""Writing files so that a reader never sees half of one: write a temporary file, then rename.

A process killed mid-write leaves the previous complete file (or none) under the real name; the
temporary name starts with '.' and carries the process id, so concurrent writers never clash.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any


def temp_name(path: str) -> str:
    """`dir/.name.tmp<pid>`: where `path` is written before it is renamed."""
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.tmp{os.getpid()}")


def remove(path: str) -> None:
    """Delete a file, link or folder tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename the result onto `path` (removed on failure)."""
    tmp = temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, value: Any, **dump_options: Any) -> None:
    """`value` as JSON (`dump_options` go to `json.dumps`, e.g. indent, sort_keys, default)."""
    atomic_write_text(path, json.dumps(value, **dump_options))


def unique_name(stem: str, taken: set[str], ext: str = "") -> str:
    """`stem + ext`, or `stem_2 + ext`, `stem_3 + ext`, ... : the first not in `taken` (compared
    case-insensitively, for case-insensitive file systems), which it is added to (lower-cased)."""
    candidate, k = stem + ext, 2
    while candidate.lower() in taken:
        candidate, k = f"{stem}_{k}{ext}", k + 1
    taken.add(candidate.lower())
    return candidate
