"""tlcli report: rebuild the report.html of a run (and its evaluations) or of one evaluation folder."""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Annotated

import typer

from tlcli.cli.console import emit_json, err, handles_errors, out
from tlcli.cli.options import JsonOpt, QuietOpt


@handles_errors
def report_cmd(
    path: Annotated[
        Path, typer.Argument(metavar="RUN", help="Run folder (e.g. runs/pets/latest) or an evaluation folder.")
    ],
    open_it: Annotated[bool, typer.Option("--open", help="Open the report in your web browser.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rebuild report.html (curves, confusion matrix, per-class scores, the photos to look at) from a folder's files.

    train-head and evaluate write it themselves; this redoes it for older runs or after adding files.
    """
    from tlcli.train import report

    written = report.rebuild(path)
    opened = bool(open_it) and webbrowser.open(written[0].resolve().as_uri())
    if open_it and not opened and not quiet:
        err.print(f"no web browser found; open {written[0]} yourself", markup=False)
    if as_json:
        emit_json({"report": str(written[0]), "reports": [str(p) for p in written], "opened": opened})
        return
    for p in written:
        out.print(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)", markup=False)
