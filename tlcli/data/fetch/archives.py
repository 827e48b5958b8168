"""The archives a fetch unpacks: a local one checked against --sha256, or downloads cached in ``DATA_DIR/.downloads``.

Each download holds a lock of its own, so two datasets built from the same file share one download.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import urllib.parse
from pathlib import Path
from typing import NamedTuple

from tlcli.data.fetch.download import download
from tlcli.data.fetch.registry import remote_url
from tlcli.data.fetch.request import Plan
from tlcli.data.fetch.sizes import Progress, need_space
from tlcli.errors import UsageError
from tlcli.store import files
from tlcli.store.locks import lock

DOWNLOADS = ".downloads"


class _Download(NamedTuple):
    url: str
    dest: Path
    size: int | None
    sha256: str | None


def _url_download(plan: Plan, downloads: Path) -> _Download:
    """A URL's cache file: its base name behind a hash of the whole URL, so two URLs never share one."""
    base = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(plan.url).path)) or "archive"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", base)
    tag = hashlib.sha256(plan.url.encode()).hexdigest()[:10]
    return _Download(plan.url, downloads / f"{tag}-{safe}", None, plan.request.sha256)


def _known_downloads(plan: Plan, data_dir: Path, force: bool) -> list[_Download]:
    """A known dataset's files, after checking there is room for what is still missing plus the unpacked copy."""
    downloads = data_dir / DOWNLOADS
    jobs = [_Download(remote_url(r), downloads / r.filename, r.size, r.sha256) for r in plan.known.files]
    downloads.mkdir(parents=True, exist_ok=True)
    missing = 0
    for job in jobs:
        if force or not job.dest.exists():
            part = job.dest.with_name(job.dest.name + ".part")
            missing += job.size - (part.stat().st_size if part.exists() and not force else 0)
    need_space(data_dir, missing + plan.known.size, f"fetching {plan.name}")
    return jobs


def _local_archive(plan: Plan) -> tuple[list[Path], dict, dict]:
    digest = files.sha256(plan.path)
    expected = plan.request.sha256
    if expected and digest != expected.lower():
        raise UsageError(f"{plan.path} has sha256 {digest}, not {expected.lower()}; nothing was unpacked")
    return [plan.path], {plan.path.name: digest}, {"bytes": 0, "resumed": False, "cached": False}


def get_archives(
    plan: Plan, data_dir: Path, *, force: bool, wait: bool, progress: Progress | None
) -> tuple[list[Path], dict, dict]:
    """Local paths of the plan's archives (downloaded or cached), their sha256s, and download totals."""
    if plan.kind == "archive":
        return _local_archive(plan)
    if plan.kind == "known":
        jobs = _known_downloads(plan, data_dir, force)
    else:
        jobs = [_url_download(plan, data_dir / DOWNLOADS)]
    fetched = {"bytes": 0, "resumed": False, "cached": True}
    digests: dict[str, str] = {}
    for job in jobs:
        name = job.dest.name
        with lock(job.dest.with_name(name + ".lock"), f"fetch-data is already downloading {name}", wait=wait):
            got = download(job.url, job.dest, size=job.size, sha256=job.sha256, force=force, progress=progress)
        fetched["bytes"] += got["bytes"]
        fetched["resumed"] |= got["resumed"]
        fetched["cached"] &= got["cached"]
        digests[name] = got["sha256"]
    return [job.dest for job in jobs], digests, fetched
