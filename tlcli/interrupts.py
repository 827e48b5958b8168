"""Ctrl-C and SIGTERM: stop at once, and make sure nothing is committed after a stop was asked for.

A signal handler's KeyboardInterrupt can be swallowed when it lands inside a callback whose
exceptions Python ignores (a weakref or __del__), so the request is also remembered and checked
at every progress update and before every file or folder is committed.
"""

from __future__ import annotations

import signal

_requested: int | None = None


def _request(signum: int, frame) -> None:
    global _requested
    _requested = signum
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGTERM like Ctrl-C; leave SIGINT alone when the parent ignores it (a background job)."""
    signal.signal(signal.SIGTERM, _request)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _request)


def requested() -> bool:
    """Whether a stop was asked for (a library may have turned its KeyboardInterrupt into another error)."""
    return _requested is not None


def check() -> None:
    """Raise KeyboardInterrupt if a stop was asked for, even if the first one was swallowed."""
    if _requested is not None:
        raise KeyboardInterrupt
