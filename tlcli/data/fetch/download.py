"""HTTP downloads that resume with Range requests, retry transient errors and verify size and sha256."""

from __future__ import annotations

import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tlcli import __version__
from tlcli.data.fetch.sizes import CHUNK, Progress, need_space, say
from tlcli.errors import TlcliError, UsageError
from tlcli.store import files

RETRIES = 5
RETRY_BACKOFF = 0.5
MAX_BACKOFF = 30.0
TIMEOUT = 60.0
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class _Transfer:
    """A download in progress: bytes in ``part`` so far, the expected total once known, bytes sent this run."""

    url: str
    part: Path
    stage: str
    total: int | None
    have: int = 0
    resumed: bool = False
    transferred: int = 0

    def restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.have, self.resumed = 0, False


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _transient_reason(exc: BaseException) -> str | None:
    """A short reason when ``exc`` is worth retrying, else None."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}" if exc.code in TRANSIENT_HTTP else None
    if isinstance(exc, urllib.error.URLError):
        if isinstance(exc.reason, socket.gaierror):
            return None
        return str(exc.reason)
    if isinstance(exc, (http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)):
        return str(exc) or type(exc).__name__
    return None


def _cached(dest: Path, size: int | None, sha256: str | None) -> dict | None:
    """The result for an existing ``dest`` that matches; a mismatching one is deleted."""
    if not dest.exists():
        return None
    digest = files.sha256(dest)
    if (size is None or dest.stat().st_size == size) and (sha256 is None or digest == sha256.lower()):
        return {"path": dest, "bytes": 0, "resumed": False, "cached": True, "sha256": digest}
    dest.unlink()
    return None


def _start(url: str, dest: Path, size: int | None) -> _Transfer:
    """Pick up ``dest.part`` where a previous run left it (unless it is already too long) and check space."""
    part = dest.with_name(dest.name + ".part")
    t = _Transfer(url, part, f"downloading {dest.name}", size)
    t.have = part.stat().st_size if part.exists() else 0
    if size is not None and t.have > size:
        t.restart()
    t.resumed = t.have > 0
    if size is not None:
        need_space(dest.parent, size - t.have, t.stage)
    return t


def _accept(t: _Transfer, resp) -> None:
    """Check the response's status and byte range against what ``t`` has and expects."""
    length = resp.headers.get("Content-Length")
    if resp.status == 206:
        start, full = _content_range(resp.headers.get("Content-Range"))
        if start != t.have:
            t.restart()
            raise ConnectionError("server answered another byte range")
        t.resumed = True
    elif resp.status == 200:
        t.have, t.resumed = 0, False
        full = int(length) if length and length.isdigit() else None
    else:
        raise UsageError(f"download of {t.url} failed: unexpected HTTP {resp.status}; check the URL")
    if full is None:
        return
    if t.total is not None and full != t.total:
        raise UsageError(
            f"{t.url} offers {full} bytes but {t.total} were expected; the file changed upstream "
            "or the URL is wrong, nothing was unpacked"
        )
    if t.total is None:
        need_space(t.part.parent, full - t.have, t.stage)
    t.total = full


def _receive(t: _Transfer, resp, progress: Progress | None) -> None:
    """Append the response body to ``t.part``; a body cut short raises ConnectionError (worth a retry)."""
    with open(t.part, "ab" if t.have else "wb") as f:
        while block := resp.read(CHUNK):
            f.write(block)
            t.have += len(block)
            t.transferred += len(block)
            say(progress, t.have, t.total, t.stage)
        f.flush()
        os.fsync(f.fileno())
    if t.total is None:
        t.total = t.have
    elif t.have < t.total:
        raise ConnectionError(f"connection closed after {t.have} of {t.total} bytes")


def _http_error(t: _Transfer, exc: urllib.error.HTTPError) -> str | None:
    """None when a 416 says ``t.part`` is already whole, the reason when worth a retry; raise otherwise."""
    if exc.code == 416 and t.have:
        _, full = _content_range(exc.headers.get("Content-Range"))
        if full == t.have and (t.total is None or t.total == t.have):
            t.total = t.have
            return None
        t.restart()
    reason = _transient_reason(exc) or ("HTTP 416" if exc.code == 416 else None)
    if reason is None:
        raise UsageError(f"download of {t.url} failed: HTTP {exc.code} {exc.reason}; check the URL") from None
    return reason


def _attempt(t: _Transfer, timeout: float, progress: Progress | None) -> str | None:
    """One request from byte ``t.have`` on: None when it got what it asked for, else why to retry."""
    headers = {"User-Agent": f"tlcli/{__version__}", "Accept-Encoding": "identity"}
    if t.have:
        headers["Range"] = f"bytes={t.have}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(t.url, headers=headers), timeout=timeout) as resp:
            _accept(t, resp)
            _receive(t, resp, progress)
    except urllib.error.HTTPError as exc:
        return _http_error(t, exc)
    except (OSError, http.client.HTTPException) as exc:
        reason = _transient_reason(exc)
        if reason is None:
            if isinstance(exc, urllib.error.URLError):
                raise UsageError(f"cannot reach {t.url}: {exc.reason}; check the URL and the network") from None
            raise
        return reason
    return None


def _transfer(t: _Transfer, retries: int, timeout: float, progress: Progress | None) -> None:
    """Request until ``t.part`` is whole, backing off after failures; progress resets the failure count."""
    failures, best = 0, t.have
    while t.total is None or t.have < t.total:
        reason = _attempt(t, timeout, progress)
        if reason is None:
            continue
        failures = 1 if t.have > best else failures + 1
        best = max(best, t.have)
        if failures > retries:
            raise TlcliError(
                f"download of {t.url} failed after {retries + 1} attempts ({reason}); "
                f"re-run to resume from the {t.have} bytes already saved"
            )
        time.sleep(min(MAX_BACKOFF, RETRY_BACKOFF * 2 ** (failures - 1)))


def _verify(part: Path, name: str, total: int | None, sha256: str | None) -> str:
    """The sha256 of a whole ``part``; a wrong size or checksum deletes it and raises UsageError."""
    actual = part.stat().st_size
    digest = files.sha256(part)
    wrong = None
    if total is not None and actual != total:
        wrong = f"is {actual} bytes, not {total}"
    elif sha256 and digest != sha256.lower():
        wrong = f"has sha256 {digest}, not {sha256.lower()}"
    if wrong:
        part.unlink(missing_ok=True)
        raise UsageError(
            f"download of {name} {wrong}; deleted it and unpacked nothing (re-run to download again, or check --sha256)"
        )
    return digest


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    sha256: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    retries: int = RETRIES,
    timeout: float = TIMEOUT,
) -> dict:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming with HTTP Range and retrying transient errors.

    The file is renamed to ``dest`` only after its size and sha256 (when given) check out; a mismatch
    deletes it and raises UsageError. An existing, matching ``dest`` is reused unless ``force``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if force:
        dest.unlink(missing_ok=True)
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)
    if cached := _cached(dest, size, sha256):
        return cached
    t = _start(url, dest, size)
    _transfer(t, retries, timeout, progress)
    digest = _verify(t.part, dest.name, t.total, sha256)
    os.replace(t.part, dest)
    return {"path": dest, "bytes": t.transferred, "resumed": t.resumed, "cached": False, "sha256": digest}
