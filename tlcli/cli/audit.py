"""tlcli audit: likely label errors, cross-split duplicates and outliers of a feature store, reported only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from tlcli.cli.console import emit_json, handles_errors, out, progress_bar, use_device
from tlcli.cli.options import (
    BalanceOpt,
    BatchOpt,
    ConfigOpt,
    DeviceOpt,
    DropoutOpt,
    EpochsOpt,
    JsonOpt,
    L2Opt,
    LrOpt,
    PatienceOpt,
    QuietOpt,
    RefitOpt,
    SeedOpt,
)
from tlcli.train.recipes import DUPLICATE_SIMILARITY, HEAD, HeadRecipe, from_options


def _tables(report: dict, top: int) -> list[Table]:
    """The top label suspects, the duplicate pairs that cross splits, and the outliers."""
    issues = Table(title=f"likely label errors (about {report['estimated_label_errors']} estimated)")
    for col in ("#", "photo", "split", "given", "predicted", "p(given)", "confident"):
        issues.add_column(col, justify="right" if col in ("#", "p(given)") else "left", overflow="fold")
    for rank, s in enumerate(report["label_issues"][:top], 1):
        issues.add_row(
            str(rank),
            escape(s["path"]),
            s["split"],
            s["label"],
            s["predicted"],
            f"{s['p_label']:.3f}",
            "yes" if s["confident"] else "",
        )
    dups = Table(title="[bold red]duplicates across splits[/]: val and test scores count photos training saw")
    for col in ("photo", "split", "duplicate", "split ", "cosine"):
        dups.add_column(col, justify="right" if col == "cosine" else "left", overflow="fold")
    for d in [d for d in report["duplicates"] if d["cross_split"]][:top]:
        cosine = "identical" if d["identical"] else f"{d['similarity']:.3f}"
        dups.add_row(escape(d["a"]["path"]), d["a"]["split"], escape(d["b"]["path"]), d["b"]["split"], cosine)
    far = Table(title="outliers (far from every class)")
    for col in ("photo", "split", "given", "distance"):
        far.add_column(col, justify="right" if col == "distance" else "left", overflow="fold")
    for o in report["outliers"][:top]:
        far.add_row(escape(o["path"]), o["split"], o["label"], f"{o['distance']:.3f}")
    return [t for t in (issues, dups, far) if t.row_count]


@handles_errors
def audit_cmd(
    ctx: typer.Context,
    *,
    features_dir: Annotated[Path, typer.Argument(help="Feature store written by 'tlcli extract'.")],
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Folder for audit.json and audit.png (default: FEATURES/audit)."),
    ] = None,
    folds: Annotated[int, typer.Option(min=3, help="Folds of the out-of-fold predictions.")] = 5,
    similarity: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Cosine of centred features from which photos are near-duplicates.")
    ] = DUPLICATE_SIMILARITY,
    top: Annotated[int, typer.Option(min=1, help="Suspects shown in the tables and the contact sheet.")] = 24,
    epochs: EpochsOpt = HEAD.epochs,
    batch_size: BatchOpt = HEAD.batch_size,
    lr: LrOpt = HEAD.learning_rate,
    dropout: DropoutOpt = HEAD.dropout,
    l2: L2Opt = HEAD.l2,
    patience: PatienceOpt = HEAD.patience,
    refit: RefitOpt = HEAD.refit,
    balance: BalanceOpt = HEAD.class_weights,
    seed: SeedOpt = HEAD.seed,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Find likely label errors, duplicates across splits and outliers from stored features; changes no data.

    Each photo is scored by a head (train-head's recipe) that did not see it. Writes audit.json and audit.png.
    """
    from tlcli.train import audit

    use_device(device, quiet or as_json)
    with progress_bar("auditing (folds)", quiet or as_json) as bar:
        report = audit.audit(
            features_dir,
            from_options(HeadRecipe, ctx.params),
            folds=folds,
            out=out_dir,
            similarity=similarity,
            top=top,
            progress=bar,
        )
    if as_json:
        emit_json(report)
        return
    for table in _tables(report, top):
        out.print(table)
    crossing = f"{report['cross_split_duplicates']} duplicate pairs across splits"
    out.print(
        f"{len(report['label_issues'])} label suspects (about {report['estimated_label_errors']} errors estimated), "
        + (f"[bold red]{crossing}[/]" if report["cross_split_duplicates"] else crossing)
        + f", {len(report['outliers'])} outliers "
        f"in {report['n']} photos (held-out accuracy {report['accuracy']:.4f}, {report['seconds']:.1f}s); "
        f"wrote {escape(report['json'])}" + (f" and {escape(report['sheet'])}" if report["sheet"] else "")
    )
