"""The `tlcli fetch-data` command: known datasets, archive URLs, local archives or folders -> data/<name>."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from tlcli import interrupts
from tlcli.cli.console import emit_json, err, handles_errors, out
from tlcli.cli.options import JsonOpt, NoLockOpt, QuietOpt, SeedOpt, locking
from tlcli.errors import UsageError


class _AmountColumn(ProgressColumn):
    """Bytes and rate for downloads, done/total for file stages."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = (DownloadColumn(), TransferSpeedColumn())
        self._count = MofNCompleteColumn()

    def render(self, task) -> Text:
        if task.fields.get("bytes"):
            return Text.assemble(self._bytes[0].render(task), " ", self._bytes[1].render(task))
        return self._count.render(task)


@contextlib.contextmanager
def _stage_bars(quiet: bool) -> Iterator[Callable[..., None]]:
    """One rich bar per stage (download, unpack, check) on stderr; silent with --quiet or off a terminal."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        _AmountColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
    )
    tasks: dict[str, int] = {}

    def update(done: int, total: int | None, stage: str = "working") -> None:
        interrupts.check()
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total, bytes=stage.startswith("downloading"))
        progress.update(tasks[stage], completed=done, total=total)

    with progress:
        yield update


def _list_known(as_json: bool) -> None:
    from tlcli.data.fetch.registry import MIRROR_ENV, known_datasets
    from tlcli.data.fetch.sizes import human_bytes

    rows = known_datasets()
    if as_json:
        emit_json(rows)
        return
    table = Table(title="Known datasets (tlcli fetch-data NAME)")
    for col in ("name", "download", "classes", "licence"):
        table.add_column(col, justify="right" if col == "download" else "left")
    for r in rows:
        table.add_row(r["name"], human_bytes(r["bytes"]), r["classes"], r["licence"])
    out.print(table)
    for r in rows:
        out.print(f"{r['name']}: {r['description']}\n  source page: {r['homepage']}", markup=False)
        for f in r["files"]:
            out.print(f"  {f['url']}  {f['bytes']} bytes  sha256 {f['sha256']}", markup=False)
    out.print(f"Set {MIRROR_ENV}=URL to fetch these files from URL/<file name> instead.", markup=False)


def _print_summary(s: dict) -> None:
    from tlcli.data.fetch.sizes import human_bytes

    if s["up_to_date"]:
        out.print(
            f"{s['path']} is already complete ({s['images']} images, {len(s['classes'])} classes); nothing to do "
            "(--force fetches it again)",
            markup=False,
        )
        return
    sp = s["splits"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["drop_reasons"].items()))
    if s["kind"] in ("archive", "folder"):
        got = f"from {s['source']}"
    elif s["cached"]:
        got = "archives from the cache"
    else:
        got = f"downloaded {human_bytes(s['downloaded_bytes'])}" + (" (resumed)" if s["resumed"] else "")
    out.print(
        f"{s['name']}: {s['images']} images in {len(s['classes'])} classes -> {s['path']} "
        f"(train {sp['train']}, val {sp['val']}, test {sp['test']}; {s['split_source']} split); "
        f"dropped {s['dropped']}" + (f" ({reasons})" if reasons else "") + f", renamed {s['renamed']}; "
        f"{got}; {s['seconds']:.1f}s",
        markup=False,
    )
    if s["dropped"] or s["renamed"]:
        err.print(f"every dropped or renamed file is listed in {s['cleaning']}", markup=False)


def fetch_step(p: dict, progress: Callable[..., None] | None) -> dict:
    """The fetch-data step from parsed options (shared by 'tlcli fetch-data' and 'tlcli run')."""
    from tlcli.data.datasets import parse_fractions
    from tlcli.data.fetch.dataset import fetch
    from tlcli.data.fetch.request import FetchRequest

    request = FetchRequest(
        p["source"],
        name=p["name"],
        labels=p["labels"],
        fractions=parse_fractions(p["split"]),
        seed=p["seed"],
        sha256=p["sha256"],
    )
    return fetch(request, data_dir=p["data_dir"], force=p["force"], wait=p["wait"], progress=progress)


@handles_errors
def fetch_data_cmd(
    ctx: typer.Context,
    *,
    source: Annotated[
        Optional[str],
        typer.Argument(
            help="A known dataset (see --list), an http(s) URL of a zip/tar archive, a local archive, "
            "or a folder of class sub-folders."
        ),
    ] = None,
    name: Annotated[
        Optional[str], typer.Option("--name", "-n", help="Folder name under --data-dir (default: from SOURCE).")
    ] = None,
    list_known: Annotated[bool, typer.Option("--list", help="List known datasets, sizes, licences, sources.")] = False,
    labels: Annotated[
        Optional[str], typer.Option(help="oxford-pets: 'breeds' (37 classes, default) or 'species' (cat, dog).")
    ] = None,
    split: Annotated[
        str, typer.Option(help="train,val,test fractions (datasets with an official split keep it).")
    ] = "0.8,0.1,0.1",
    seed: SeedOpt = 0,
    sha256: Annotated[
        Optional[str], typer.Option("--sha256", help="Expected sha256 of a URL or local archive.")
    ] = None,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where datasets go; archives are cached in DATA_DIR/.downloads.")
    ] = Path("data"),
    force: Annotated[bool, typer.Option("--force", help="Download and rebuild even if already there.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for a concurrent fetch of the same dataset.")] = False,
    no_lock: NoLockOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download a dataset (resumable, checksummed), unpack it safely, drop broken images, split it.

    Writes DATA_DIR/NAME/<class>/<image> plus split.json, dataset.json and cleaning.json; re-running
    on a complete dataset does nothing. TLCLI_DATASET_MIRROR=URL fetches known datasets from a mirror.
    """
    locking(no_lock)
    if list_known:
        _list_known(as_json)
        return
    if not source:
        raise UsageError("give a dataset name (see 'tlcli fetch-data --list'), a URL, an archive or a folder")
    with _stage_bars(quiet or as_json) as bar:
        summary = fetch_step(ctx.params, bar)
    if as_json:
        emit_json(summary)
        return
    _print_summary(summary)
