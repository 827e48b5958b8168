"""The one way files are written (atomically: temp file, fsync, rename), read back, hashed and cleaned up."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tlcli import interrupts
from tlcli.errors import UsageError


def umask() -> int:
    """The process umask (read without changing it), for files made by mkstemp or mkdtemp."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    An OSError that names no file (a full disk, a quota) is raised again naming ``path``.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.fchmod(fd, 0o666 & ~umask())
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        interrupts.check()
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file written by tlcli, with a one-line error when it is missing or damaged."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); re-run the step that wrote it") from None


def remove_leftovers(folder: str | os.PathLike, *, prefix: str = "") -> list[str]:
    """Delete temp files, staging, half-pruned and swapped-out folders a killed process left in ``folder``.

    ``prefix`` keeps it to one item's leftovers (``.<prefix>staging-*``, ...) where each item has its own lock.
    Only call this while holding the lock that covers them: then no live writer owns any of them.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    kinds = tuple(f".{prefix}{kind}" for kind in ("staging-", "pruned-", "old-"))
    removed = []
    for p in root.iterdir():
        name = p.name
        if not name.startswith(f".{prefix}") or not (name.startswith(kinds) or ".tmp" in name and not p.is_dir()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(name)
    return removed


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks: weights files and downloads are checked with it."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """Short content hash (blake2b, 128 bits) that identifies an image file across renames and re-runs."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
