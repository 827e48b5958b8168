"""Build a dataset folder in staging: get the archives or copy the folder, unpack, lay out, clean, split, describe."""

from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from tlcli import __version__
from tlcli.data import datasets
from tlcli.data.fetch import layouts
from tlcli.data.fetch.archives import get_archives
from tlcli.data.fetch.clean import clean
from tlcli.data.fetch.registry import remote_url
from tlcli.data.fetch.request import Plan
from tlcli.data.fetch.sizes import Progress, folder_bytes, need_space
from tlcli.data.fetch.unpack import MAX_FILES, MAX_UNPACKED_BYTES, extract_archive, unpacked_size
from tlcli.errors import UsageError
from tlcli.store.files import write_json


@dataclass(frozen=True)
class Job:
    """One fetch being built: its plan, the staging folder it builds in, and how it downloads and unpacks."""

    plan: Plan
    data_dir: Path
    staging: Path
    force: bool = False
    wait: bool = False
    progress: Progress | None = None
    max_bytes: int = MAX_UNPACKED_BYTES
    max_files: int = MAX_FILES

    @property
    def out(self) -> Path:
        """The dataset folder being built, renamed to ``DATA_DIR/<name>`` once complete."""
        return self.staging / self.plan.name


class _Filled(NamedTuple):
    digests: dict
    fetched: dict
    official: dict | None
    drops: list[dict]


@contextlib.contextmanager
def _deleted_if_refused(job: Job, archive: Path) -> Iterator[None]:
    """A download refused as unsafe or damaged is deleted from the cache (a local archive never is)."""
    try:
        yield
    except UsageError:
        if job.plan.kind != "archive":
            archive.unlink(missing_ok=True)
        raise


def _unpack(job: Job, archives: list[Path]) -> Path:
    """Unpack every archive into ``staging/raw``; a zip bomb is refused before the free-space check."""
    raw = job.staging / "raw"
    for archive in archives:
        with _deleted_if_refused(job, archive):
            size = unpacked_size(archive, job.max_bytes)
        need_space(job.data_dir, size, f"unpacking {archive.name}")
        with _deleted_if_refused(job, archive):
            extract_archive(archive, raw, max_bytes=job.max_bytes, max_files=job.max_files, progress=job.progress)
    return raw


def _fill(job: Job) -> _Filled:
    """Put the source's class folders into ``job.out``; Oxford-IIIT Pet also gives its official lists and drops."""
    plan = job.plan
    if plan.kind == "folder":
        need_space(job.data_dir, folder_bytes(plan.path), f"copying {plan.path}")
        layouts.copy_folder(plan.path, job.out)
        return _Filled({}, {"bytes": 0, "resumed": False, "cached": False}, None, [])
    archives, digests, fetched = get_archives(plan, job.data_dir, force=job.force, wait=job.wait, progress=job.progress)
    raw = _unpack(job, archives)
    official, drops = None, []
    if plan.official_split:
        official, drops = layouts.oxford(raw, job.out, plan.labels or "breeds")
    else:
        layouts.class_folders(raw, job.out, lowercase=plan.known is not None)
    shutil.rmtree(raw, ignore_errors=True)
    return _Filled(digests, fetched, official, drops)


def _scan_built(out: Path, source: str) -> datasets.Dataset:
    """Scan the cleaned dataset; a one-line error in terms of the user's source when it is not a dataset."""
    try:
        return datasets.scan(out)
    except UsageError:
        dirs = sorted(d for d in out.iterdir() if d.is_dir()) if out.is_dir() else []
        found = [d.name for d in dirs if any(f.is_file() for f in d.rglob("*"))]
        listed = f" ({', '.join(found[:5])})" if found else ""
        raise UsageError(
            f"{source} holds {len(found)} class folder(s) with images{listed}; a dataset needs at least two "
            "sub-folders of images, one per class"
        ) from None


def _split(job: Job, ds: datasets.Dataset, official: dict | None, records: list[dict]) -> dict:
    """The official lists (with cleaning's renames and drops applied), or a seeded stratified split."""
    seed = job.plan.request.seed
    if official is not None:
        return layouts.official_split(job.out, official, {r["path"]: r.get("to") for r in records}, seed)
    assigned, _ = datasets.assign_splits(ds, job.plan.request.fractions, seed)
    return {s: [rel for rel in ds.files if assigned[rel] == s] for s in datasets.SPLITS}


def _cleaning(ds: datasets.Dataset, records: list[dict], drops: list[dict]) -> dict:
    """The counts cleaning.json and dataset.json report: checked, kept, dropped (by reason), renamed."""
    every = drops + records
    reasons = Counter(r["reason"] for r in every if r["action"] == "dropped")
    return {
        "checked": len(ds.files) + sum(1 for r in records if r["action"] == "dropped"),
        "kept": len(ds.files),
        "dropped": sum(reasons.values()),
        "renamed": sum(1 for r in every if r["action"] in ("renamed", "converted")),
        "reasons": dict(reasons),
    }


def _describe(plan: Plan, ds: datasets.Dataset, split: dict, cleaning: dict, digests: dict) -> dict:
    """dataset.json: where the images came from, what was kept, how they are split, and what made it."""
    counts = Counter(ds.classes[label] for label in ds.labels)
    known = plan.known
    return {
        "name": plan.name,
        "source": plan.source,
        "kind": plan.kind,
        "request": plan.recorded,
        "urls": [remote_url(r) for r in known.files] if known else ([plan.url] if plan.url else []),
        "homepage": known.homepage if known else None,
        "licence": known.licence if known else None,
        "sha256": digests,
        "classes": ds.classes,
        "counts": {c: counts[c] for c in ds.classes},
        "images": len(ds.files),
        "splits": {s: len(split[s]) for s in datasets.SPLITS},
        "split_source": "official" if plan.official_split else "stratified",
        "split_fractions": None if plan.official_split else list(plan.request.fractions),
        "seed": plan.request.seed,
        "cleaning": cleaning,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "tlcli": __version__,
    }


def build(job: Job) -> tuple[dict, dict]:
    """Download, unpack, lay out, clean and split into ``job.out``; return (dataset.json, download totals)."""
    filled = _fill(job)
    records = clean(job.out, progress=job.progress) if job.out.is_dir() else []
    ds = _scan_built(job.out, job.plan.source)
    for empty in ds.empty_classes:
        shutil.rmtree(job.out / empty, ignore_errors=True)
    split = _split(job, ds, filled.official, records)
    cleaning = _cleaning(ds, records, filled.drops)
    write_json(job.out / "split.json", split)
    write_json(job.out / "cleaning.json", {**cleaning, "records": filled.drops + records})
    meta = _describe(job.plan, ds, split, cleaning, filled.digests)
    write_json(job.out / "dataset.json", meta)
    return meta, filled.fetched
