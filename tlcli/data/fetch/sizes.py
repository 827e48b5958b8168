"""What every fetch stage shares: progress reports, the copy block size, free-space checks, byte counts in words."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from tlcli.errors import UsageError

Progress = Callable[..., None]
"""``progress(done, total, stage)``: bytes while downloading, files while unpacking and checking."""

CHUNK = 256 * 1024
SPACE_MARGIN = 64 * 2**20


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as download pages use)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def say(progress: Progress | None, done: int, total: int | None, stage: str) -> None:
    """Report ``done`` of ``total`` for ``stage`` when there is a progress callback."""
    if progress is not None:
        progress(done, total, stage)


def need_space(folder: Path, nbytes: int, what: str) -> None:
    """Refuse, with a one-line error, to start a stage that would fill the disk under ``folder``."""
    free = shutil.disk_usage(folder).free
    if nbytes > 0 and nbytes + SPACE_MARGIN > free:
        raise UsageError(
            f"not enough free space in {folder}: {what} needs {human_bytes(nbytes)} but only "
            f"{human_bytes(free)} is free; free some space or pass --data-dir on a bigger disk"
        )


def folder_bytes(folder: Path) -> int:
    """Bytes of the visible files under ``folder`` (hidden folders skipped), to check space before a copy."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total
