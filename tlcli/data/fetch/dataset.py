"""``fetch``: the whole fetch-data job, from a request to a published ``DATA_DIR/<name>`` and its summary.

The folder is built in a hidden ``.<name>.staging-*`` beside it, under the dataset's lock, and renamed into
place only when complete; a finished folder made by the same request is left alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tlcli.data.fetch.build import Job, build
from tlcli.data.fetch.request import FetchRequest, Plan, resolve
from tlcli.data.fetch.sizes import Progress
from tlcli.data.fetch.unpack import MAX_FILES, MAX_UNPACKED_BYTES
from tlcli.errors import UsageError
from tlcli.store import files, runs
from tlcli.store.files import read_json
from tlcli.store.locks import lock


def _is_complete(dest: Path, recorded: dict) -> dict | None:
    """The dataset.json of a finished fetch made with the same request, else None."""
    meta_path = dest / "dataset.json"
    if not meta_path.is_file() or not (dest / "split.json").is_file():
        return None
    try:
        meta = read_json(meta_path)
    except UsageError:
        return None
    return meta if meta.get("request") == recorded else None


def _check_destination(plan: Plan, dest: Path) -> None:
    """A folder source must not overlap its destination."""
    if plan.path is not None and plan.kind == "folder":
        target = dest.resolve()
        if target == plan.path or plan.path in target.parents or target in plan.path.parents:
            raise UsageError(f"{plan.path} overlaps the destination {dest}; pass another --name or --data-dir")


def _check_replaceable(dest: Path, force: bool) -> None:
    """Only --force replaces a folder that holds another dataset, or something else."""
    if (dest.exists() or dest.is_symlink()) and not force:
        what = "another source or other options" if (dest / "dataset.json").is_file() else "something else"
        raise UsageError(f"{dest} already exists and holds {what}; pass --force to replace it or choose another --name")


def summary(meta: dict, dest: Path, seconds: float, *, up_to_date: bool, fetched: dict | None = None) -> dict:
    """What fetch-data prints (or emits as JSON): the dataset.json essentials plus what this run did."""
    fetched = fetched or {}
    return {
        "name": meta["name"],
        "path": str(dest),
        "source": meta["source"],
        "kind": meta["kind"],
        "classes": meta["classes"],
        "counts": meta["counts"],
        "images": meta["images"],
        "splits": meta["splits"],
        "split_source": meta["split_source"],
        "dropped": meta["cleaning"]["dropped"],
        "renamed": meta["cleaning"]["renamed"],
        "drop_reasons": meta["cleaning"]["reasons"],
        "cleaning": str(dest / "cleaning.json"),
        "sha256": meta["sha256"],
        "downloaded_bytes": fetched.get("bytes", 0),
        "resumed": fetched.get("resumed", False),
        "cached": fetched.get("cached", up_to_date),
        "up_to_date": up_to_date,
        "seconds": round(seconds, 3),
    }


def fetch(
    request: FetchRequest,
    *,
    data_dir: str | os.PathLike = "data",
    force: bool = False,
    wait: bool = False,
    progress: Progress | None = None,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_files: int = MAX_FILES,
) -> dict:
    """Fetch a known dataset, an archive URL, a local archive or a folder into ``data_dir/<name>``.

    Writes ``<class>/<file>``, ``split.json``, ``dataset.json`` and ``cleaning.json``; a complete
    dataset from the same request is a no-op unless ``force``. Returns a summary.
    """
    started = time.monotonic()
    plan = resolve(request)
    data_dir = Path(data_dir)
    dest = data_dir / plan.name
    _check_destination(plan, dest)
    if not force and (meta := _is_complete(dest, plan.recorded)):
        return summary(meta, dest, time.monotonic() - started, up_to_date=True)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {data_dir}: {exc.strerror}; choose another --data-dir") from None
    with lock(data_dir / f"{plan.name}.lock", f"fetch-data is already fetching {plan.name}", wait=wait):
        if not force and (meta := _is_complete(dest, plan.recorded)):
            return summary(meta, dest, time.monotonic() - started, up_to_date=True)
        _check_replaceable(dest, force)
        files.remove_leftovers(data_dir, prefix=f"{plan.name}.")
        with runs.staging_dir(data_dir, prefix=f"{plan.name}.") as staging:
            job = Job(
                plan,
                data_dir,
                staging,
                force=force,
                wait=wait,
                progress=progress,
                max_bytes=max_bytes,
                max_files=max_files,
            )
            meta, fetched = build(job)
            runs.publish(job.out, data_dir, name=plan.name)
    return summary(meta, dest, time.monotonic() - started, up_to_date=False, fetched=fetched)
