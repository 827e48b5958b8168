"""tlcli evaluate, predict and export: using a trained run."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tlcli.cli.console import emit_json, err, handles_errors, native_stderr_silenced, out, progress_bar, use_device
from tlcli.cli.options import (
    BatchOpt,
    ConfigOpt,
    DeviceOpt,
    EngineOpt,
    JsonOpt,
    MinAccuracyOpt,
    QuietOpt,
    UnknownOpt,
)
from tlcli.errors import GateError, UsageError


def per_class_table(result: dict) -> Table:
    table = Table(title=f"{result['source']}: accuracy {result['accuracy']:.4f} on {result['n']} images")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, c in result["per_class"].items():
        table.add_row(name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
    return table


def passes_gate(result: dict, min_accuracy: float | None) -> bool:
    """Record ``--min-accuracy`` and whether ``result`` passed it; True when the gate failed."""
    failed = min_accuracy is not None and result["accuracy"] < min_accuracy
    result.update(min_accuracy=min_accuracy, passed=not failed)
    return failed


def evaluate_step(p: dict, progress: Callable[[int, int], None] | None) -> dict:
    """The evaluate step from parsed options (shared by 'tlcli evaluate' and 'tlcli run')."""
    from tlcli.train import evaluate

    return evaluate.evaluate_run(
        p["run"],
        p["data_dir"],
        top_k=p["top_k"],
        out=p["out_dir"],
        batch_size=p["batch_size"],
        progress=progress,
        unknowns=p["unknowns"],
        engine=p["engine"],
    )


def trust_lines(result: dict) -> list[str]:
    """evaluate's lines on calibration and unknown inputs."""
    c, u = result["calibration"], result.get("unknown")
    lines = [
        f"expected calibration error {c['ece']:.4f}"
        + (f" (before temperature {c['temperature']:g}: {c['ece_before_temperature']:.4f})" if c["temperature"] else "")
    ]
    if u:
        lines.append(f"unknown score above {u['threshold']:.4f}: {u['flagged']:.1%} of these {u['n']} photos")
        if "auroc" in u:
            lines.append(f"  and {u['unknowns_flagged']:.1%} of {u['unknowns_n']} unknowns; AUROC {u['auroc']:.4f}")
    return lines


@handles_errors
def evaluate_cmd(
    ctx: typer.Context,
    *,
    run: Annotated[Path, typer.Argument(help="Run folder, e.g. runs/pets/latest.")],
    data_dir: Annotated[
        Optional[Path], typer.Argument(help="Folder of class sub-folders (default: the run's test split).")
    ] = None,
    min_accuracy: MinAccuracyOpt = None,
    top_k: Annotated[int, typer.Option(min=1, help="Also report top-k accuracy.")] = 5,
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Where to write metrics.json, report.html and the rest."),
    ] = None,
    unknowns: Annotated[
        Optional[Path],
        typer.Option(help="Folder of photos of no known class: report how many the unknown score flags, and AUROC."),
    ] = None,
    batch_size: BatchOpt = 32,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    engine: EngineOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Accuracy, top-k, per-class precision/recall/F1, confusion matrix, misclassified files, calibration error
    (and a reliability diagram) and the share of photos the unknown score flags."""
    use_device(device, quiet or as_json)
    with progress_bar("evaluating", quiet or as_json) as bar:
        result = evaluate_step(ctx.params, bar)
    gate_failed = passes_gate(result, min_accuracy)
    if as_json:
        emit_json(result)
    else:
        out.print(per_class_table(result))
        out.print(
            f"accuracy {result['accuracy']:.4f}, top-{result['top_k']} {result['top_k_accuracy']:.4f}, "
            f"{len(result['misclassified'])} misclassified; report {result['report']}"
        )
        for line in trust_lines(result):
            out.print(line, markup=False)
        for item in result["skipped"]:
            err.print(f"skipped {item['path']}: {item['reason']}", markup=False)
    if gate_failed:
        raise GateError(f"accuracy {result['accuracy']:.4f} is below --min-accuracy {min_accuracy}")


def _stream_json(batches: Iterator[tuple[list[dict], list[dict]]]) -> None:
    """One JSON line per image, written as each batch is scored: its results, then the files it could not read."""
    scored = 0
    for rows, skipped in batches:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        for item in skipped:
            sys.stdout.write(json.dumps({"path": item["path"], "error": item["reason"]}) + "\n")
        sys.stdout.flush()
        scored += len(rows)
    if not scored:
        raise UsageError("no image could be read; check the paths")


@handles_errors
def predict_cmd(
    *,
    run: Annotated[Path, typer.Argument(help="Run folder, e.g. runs/pets/latest.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to show per image.")] = 3,
    unknown: UnknownOpt = "on",
    batch_size: BatchOpt = 32,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    engine: EngineOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Classify photos: a top-k table, or one JSON object per line with --json; photos unlike any training photo
    (unknown score above the run's threshold) are called unknown."""
    from tlcli.train import predict

    use_device(device, quiet or as_json)
    files, on = [str(p) for p in paths], unknown == "on"
    if as_json:
        _stream_json(
            predict.predict_batches(run, files, top_k=top_k, batch_size=batch_size, unknown_score=on, engine=engine)
        )
        return
    with progress_bar("predicting", quiet) as bar:
        rows, skipped = predict.predict_paths(
            run, files, top_k=top_k, batch_size=batch_size, progress=bar, unknown_score=on, engine=engine
        )
    table = Table()
    table.add_column("file")
    for i in range(min(top_k, len(rows[0]["top"]) if rows else top_k)):
        table.add_column(f"#{i + 1}")
    scored = bool(rows) and "unknown" in rows[0]
    if scored:
        table.add_column("unknown score", justify="right")
    for row in rows:
        flag = [f"{'unknown ' if row['unknown'] else ''}{row['unknown_score']:.3f}"] if scored else []
        table.add_row(row["path"], *[f"{t['class']} {t['probability']:.3f}" for t in row["top"]], *flag)
    out.print(table)
    for item in skipped:
        err.print(f"skipped {item['path']}: {item['reason']}", markup=False)
    if not rows:
        raise UsageError("no image could be read; check the paths")


@handles_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder, e.g. runs/pets/latest.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="model.tflite file or SavedModel folder.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="tflite, savedmodel or onnx (needs tlcli[onnx]).")
    ] = "tflite",
    quantize: Annotated[
        str,
        typer.Option(
            help="tflite: none, dynamic (int8 weights), float16, or int8 (full integer, calibrated "
            "on the run's images)."
        ),
    ] = "none",
    check_images: Annotated[
        Optional[int],
        typer.Option(min=1, help="Check on at most this many of the run's test photos (default: all of them)."),
    ] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a run as a SavedModel serving image bytes, or TFLite (labels inside and beside), checked first.

    The export, fed the test photos' file bytes, must agree with 'tlcli predict' on top-1 for 99.5% of
    them (97% for int8), or nothing is written and the exit code is 3.
    """
    from tlcli.train import export

    use_device(device, quiet or as_json)
    with native_stderr_silenced():
        summary = export.export(run_dir, out_path, fmt=fmt, quantize=quantize, check_images=check_images)
    if as_json:
        emit_json(summary)
        return
    out.print(
        f"wrote {', '.join(summary['files'])} ({summary['bytes'] / 1e6:.1f} MB); fed the file bytes of "
        f"{summary['checked_images']} photos, top-1 agrees with tlcli predict {summary['top1_agreement']:.1%}, "
        "max probability difference "
        f"{summary['max_probability_difference']:.4f}"
    )
