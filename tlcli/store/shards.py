"""Which worker of an array job extracts which file, and where each worker writes its part.

A file belongs to shard ``1 + h mod N``, h the first 8 bytes of the sha256 of its relative path.
Each worker computes that from the path alone, so the assignment does not depend on the order files
are listed in, on the machine, or on the other files: a file stays in its shard when the folder
grows, and a re-run of that shard reuses its own part. The price is that shards are balanced only
on average (about M/N ± sqrt(M/N) files each for M files); a sorted slice would be exactly even but
moves files between shards whenever one is added or removed.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from tlcli.errors import UsageError

SHARDS_DIR = "shards"
_PART = re.compile(r"(\d+)-of-(\d+)")


def parse(text: str) -> tuple[int, int]:
    """Parse ``--shard I/N`` (1 <= I <= N) into (I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    index, count = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not 1 <= index <= count:
        raise UsageError(
            f"--shard {text!r} must be I/N with 1 <= I <= N, e.g. 3/8 for worker 3 of 8 "
            "(a 0-based array index i is --shard $((i+1))/N)"
        )
    return index, count


def label(index: int, count: int) -> str:
    return f"{index}/{count}"


def index_of(rel: str, count: int) -> int:
    """The shard (1..count) of a file, from its path relative to the data folder."""
    return 1 + int.from_bytes(hashlib.sha256(rel.encode("utf-8", "surrogateescape")).digest()[:8], "big") % count


def part_dir(out: str | os.PathLike, index: int, count: int) -> Path:
    """Where worker ``index`` of ``count`` writes its part of the store at ``out``."""
    return Path(out) / SHARDS_DIR / f"{index}-of-{count}"


def counts(out: str | os.PathLike) -> list[int]:
    """The shard counts N that have part folders under ``out/shards``."""
    root = Path(out) / SHARDS_DIR
    if not root.is_dir():
        return []
    found = {int(m.group(2)) for d in root.iterdir() if d.is_dir() and (m := _PART.fullmatch(d.name))}
    return sorted(found)
