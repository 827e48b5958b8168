"""Locks held by the kernel (``flock``) that keep two tlcli processes, on one host or several, from writing one folder.

The kernel (or, on NFS v4, the server) releases a lock when its holder dies, so a killed writer's lock is
free again without guessing from pids, which mean nothing across hosts or pid namespaces. The lock file
holds the holder's host, pid, start time and command, for the message a refused writer prints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from tlcli import interrupts
from tlcli.errors import UsageError

LOCK_NAME = ".tlcli.lock"
"""The lock file a writer holds in a feature store or runs folder."""

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_held: dict[str, object] = {}
"""The locks this process holds, by real path, each with the token of the ``lock`` call that took it."""
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn locking on or off for this process (``--no-lock``: one writer on a filesystem without locks)."""
    global _enabled
    _enabled = enabled


def _holder() -> bytes:
    """Who holds the lock, for the message of a writer it stops."""
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        }
    ).encode()


def _describe(path: Path) -> str:
    """The holder as its lock file records it ("pid 12 on host a, since ...: command")."""
    try:
        who = json.loads(path.read_text())
        return f"pid {who['pid']} on host {who['host']}, since {who['since']}: {who['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a holder that has not yet written its name"


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or None while another process holds it.

    A holder deletes the file as it lets go, so a lock won on a file no longer at ``path`` is tried again.
    """
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                path.unlink(missing_ok=True)
                raise UsageError(
                    f"the filesystem of {path.parent} does not support file locks ({exc.strerror}); write on one "
                    "that does (see README, Locks), or pass --no-lock if no other tlcli writes there"
                ) from None
            raise
        with contextlib.suppress(FileNotFoundError):
            mine, there = os.fstat(fd), os.stat(path)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                return fd
        os.close(fd)


def _release(fd: int, path: Path, made_folder: bool) -> None:
    """Delete the lock file (and the folder the lock made, if still empty) while holding it, then let go."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if made_folder:
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    os.close(fd)


@contextlib.contextmanager
def lock(path: str | os.PathLike, what: str, wait: bool = False, poll: float = 0.5) -> Iterator[None]:
    """Hold the kernel lock of ``path`` while the block runs; a writer it stops reads who holds it there.

    Another holder makes this raise UsageError naming it, or, with ``wait``, poll until it lets go. A lock
    this process already holds is re-entered, so ``tlcli run`` can hold its folders across the steps.
    """
    path = Path(path)
    key = str(path.resolve())
    if not _enabled or key in _held:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
        return
    made_folder = not path.parent.exists()
    try:
        while (fd := _try_lock(path)) is None:
            if not wait:
                raise UsageError(f"another tlcli {what} ({_describe(path)}); wait for it, or re-run with --wait")
            interrupts.check()
            time.sleep(poll)
    except BaseException:
        if made_folder:
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        raise
    token = _held[key] = object()
    try:
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, only unnamed
            os.ftruncate(fd, 0)
            os.write(fd, _holder())
        yield
    finally:
        if _held.get(key) is token:
            del _held[key]
        _release(fd, path, made_folder)
