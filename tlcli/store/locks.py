"""Lock files that keep two tlcli processes from writing the same folder; a dead holder's lock is taken over."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tlcli.errors import UsageError

LOCK_NAME = ".tlcli.lock"
"""The lock file a writer holds in a feature store or runs folder."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _lock_owner(path: Path) -> int | None:
    """The pid in a lock file; 0 when it is unreadable, None when the file is gone."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def _lock_is_stale(path: Path, pid: int) -> bool:
    if pid:
        return not _pid_alive(pid)
    with contextlib.suppress(FileNotFoundError):
        return time.time() - path.stat().st_mtime > 10
    return False


def _take_over(path: Path, stale_pid: int) -> None:
    """Remove a dead process's lock; if a live process re-took it meanwhile, put that lock back."""
    grave = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    if _lock_owner(grave) not in (stale_pid, None):
        with contextlib.suppress(FileExistsError):
            os.link(grave, path)
    grave.unlink(missing_ok=True)


@contextlib.contextmanager
def lock(path: str | os.PathLike, what: str, wait: bool = False, poll: float = 0.5) -> Iterator[None]:
    """Hold ``path`` (created O_EXCL with our pid inside) while the block runs; a dead pid's lock is taken over.

    A live holder makes this raise UsageError, or, with ``wait``, poll until it is gone. A lock this
    process already holds is re-entered, so ``tlcli run`` can hold its folders across the steps.
    """
    path = Path(path)
    if _lock_owner(path) == os.getpid():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is None:
                continue
            if _lock_is_stale(path, owner):
                _take_over(path, owner)
                continue
            if not wait:
                raise UsageError(
                    f"another tlcli {what} (pid {owner or '?'}, lock {path}); "
                    f"wait for it, re-run with --wait, or delete {path} if no such process is running"
                ) from None
            time.sleep(poll)
            continue
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        break
    try:
        yield
    finally:
        if _lock_owner(path) == os.getpid():
            path.unlink(missing_ok=True)
