"""`tlcli run CONFIG` (fetch-data -> extract -> train-head -> evaluate -> promote, for cron) and `tlcli runs`."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tlcli import interrupts
from tlcli.cli import data, evaluate, extract, train
from tlcli.cli.console import emit_json, err, handles_errors, log, out, progress_bar, use_device
from tlcli.cli.evaluate import evaluate_step
from tlcli.cli.extract import extract_step
from tlcli.cli.options import (
    DeviceOpt,
    JsonOpt,
    KeepOpt,
    QuietOpt,
    TensorboardOpt,
    WaitOpt,
    read_config,
    section_defaults,
)
from tlcli.cli.train import train_step
from tlcli.errors import EXIT_GATE, TlcliError, UsageError
from tlcli.store import files, runs
from tlcli.store.locks import LOCK_NAME

STEP_COMMANDS = {
    "fetch-data": data.fetch_data_cmd,
    "extract": extract.extract_cmd,
    "train-head": train.train_head_cmd,
    "evaluate": evaluate.evaluate_cmd,
}
STEPS = tuple(STEP_COMMANDS)


def _command(name: str) -> typer.core.TyperCommand:
    """The click command of one step, as the app registers it (its options, types and defaults)."""
    single = typer.Typer()
    single.command(name)(STEP_COMMANDS[name])
    return typer.main.get_command(single)


def parse_step(name: str, doc: dict, path: Path, overrides: dict) -> dict:
    """Options of one step exactly as its subcommand would parse them from the config's [name] table."""
    command = _command(name)
    defaults = {**section_defaults(command, name, doc, path), **overrides}
    try:
        ctx = command.make_context(name, [], default_map=defaults)
    except typer.exceptions.TyperException as exc:
        raise UsageError(f"config {path} [{name}]: {exc.format_message()}") from None
    return dict(ctx.params)


@contextlib.contextmanager
def _locked(folders: list[Path], wait: bool) -> Iterator[None]:
    """Hold the locks of every folder the pipeline writes, so a second run stops at once with the lock message."""
    from tlcli.store import locks

    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(locks.lock(folder / LOCK_NAME, f"run is writing {folder}", wait=wait))
        yield


def _timed(steps: list[dict], name: str, fn: Callable[[], dict], describe: Callable[[dict], str]) -> dict:
    started = time.perf_counter()
    interrupts.check()
    try:
        summary = fn()
    except TlcliError:
        err.print(f"run: step {name} failed after {time.perf_counter() - started:.1f}s", markup=False)
        raise
    steps.append(
        {"step": name, "seconds": round(time.perf_counter() - started, 3), "did": describe(summary), "summary": summary}
    )
    return summary


def steps_record(steps: list[dict]) -> list[dict]:
    """What each step did and how long it took, without the full summaries."""
    return [{k: v for k, v in s.items() if k != "summary"} for s in steps]


def _describe_extract(s: dict) -> str:
    return (
        f"{s['stored']} images ({s['splits']['train']}/{s['splits']['val']}/{s['splits']['test']}): "
        f"extracted {s['extracted']}, reused {s['reused']}, skipped {len(s['skipped'])}"
    )


def _describe_train(s: dict) -> str:
    test = f", test {s['test_accuracy']:.4f}" if s["test_accuracy"] is not None else ""
    prev = s["previous_val_accuracy"]
    return (
        f"run {Path(s['run']).name}: val {s['val_accuracy']:.4f}{test} after {s['epochs_run']} epochs; "
        f"latest had {'-' if prev is None else f'{prev:.4f}'}"
    )


@handles_errors
def run_cmd(
    config: Annotated[Path, typer.Argument(help="Workflow TOML (configs/*.toml) with [extract], [train-head], ...")],
    promote_if_better: Annotated[
        bool, typer.Option(help="Promote only if val accuracy beats the current latest (else exit 3).")
    ] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed for every step (default: each step's config).")] = None,
    keep: KeepOpt = None,
    tensorboard: TensorboardOpt = None,
    as_json: JsonOpt = False,
    wait: WaitOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Fetch (if the config names a dataset), extract (incremental), train a head, evaluate, promote.

    Each step is the same code as its subcommand, with options from the config's [fetch-data],
    [extract], [train-head] and [evaluate] tables. The new run becomes latest only if it passes
    [evaluate] min_accuracy and, with --promote-if-better, beats latest on val accuracy; otherwise
    it is kept but not promoted and the exit code is 3. Cron: `tlcli run CONFIG --promote-if-better --json`.
    """
    doc = read_config(config)
    missing = [s for s in ("extract", "train-head") if s not in doc]
    if missing:
        raise UsageError(f"config {config} has no [{'], ['.join(missing)}] table; see configs/cats_vs_dogs.toml")
    unknown = sorted(set(doc) - set(STEPS))
    if unknown:
        raise UsageError(f"config {config}: unknown table(s) [{'], ['.join(unknown)}]; known: {', '.join(STEPS)}")
    common = {"wait": wait, "quiet": True, "as_json": True, **({"seed": seed} if seed is not None else {})}
    quiet = quiet or as_json
    fp = parse_step("fetch-data", doc, config, common) if "fetch-data" in doc else None
    if fp is not None and not fp["source"]:
        raise UsageError(f"config {config} [fetch-data] needs source = a dataset name, URL, archive or folder")
    data_from_fetch = fp is not None and "data_dir" not in doc["extract"]
    ep = parse_step("extract", doc, config, {**common, **({"data_dir": "."} if data_from_fetch else {})})
    if ep["shard"] is not None or ep["merge_shards"]:
        raise UsageError(f"config {config} [extract]: tlcli run extracts the whole folder; drop shard/merge_shards")
    tp = parse_step(
        "train-head",
        doc,
        config,
        {
            **common,
            "features_dir": ep["out_dir"],
            "promote_if_better": promote_if_better,
            **({"keep": keep} if keep is not None else {}),
            **({"tensorboard": tensorboard} if tensorboard is not None else {}),
        },
    )
    vp = parse_step("evaluate", doc, config, {**common, "run": tp["out_dir"]})
    use_device(device, quiet)
    steps: list[dict] = []
    started = time.perf_counter()

    if fp is not None:
        with progress_bar("fetching", quiet) as bar:
            fetched = _timed(
                steps, "fetch-data", lambda: data.fetch_step(fp, bar), lambda s: f"{s['images']} images -> {s['path']}"
            )
        if data_from_fetch:
            ep["data_dir"] = Path(fetched["path"])
    runs_root = Path(tp["out_dir"])
    config_record = {
        "file": str(Path(config).resolve()),
        "sha256": hashlib.sha256(Path(config).read_bytes()).hexdigest(),
        "tables": doc,
        "command_line": {"promote_if_better": promote_if_better, "seed": seed, "keep": keep},
    }
    with _locked([Path(ep["out_dir"]), runs_root], wait):
        with progress_bar("extracting", quiet) as bar:
            extracted = _timed(steps, "extract", lambda: extract_step(ep, bar), _describe_extract)
        with progress_bar("training head (epochs)", quiet) as bar:
            trained = _timed(
                steps,
                "train-head",
                lambda: train_step(tp, bar, defer_promotion=True, config=config_record),
                _describe_train,
            )
        vp["run"] = Path(trained["run"])
        with progress_bar("evaluating", quiet) as bar:
            evaluated = _timed(
                steps,
                "evaluate",
                lambda: evaluate_step(vp, bar),
                lambda s: f"accuracy {s['accuracy']:.4f} on {s['n']} images ({s['source']})",
            )
        gate = vp["min_accuracy"]
        passed_gate = gate is None or evaluated["accuracy"] >= gate
        promote = passed_gate and (trained["better"] or not promote_if_better)
        if not passed_gate:
            reason = f"accuracy {evaluated['accuracy']:.4f} is below min_accuracy {gate}"
        elif not promote:
            reason = f"val {trained['val_accuracy']:.4f} does not beat latest {trained['previous_val_accuracy']:.4f}"
        else:
            reason = (
                "passed"
                + (f" min_accuracy {gate}" if gate is not None else "")
                + (", better than latest" if promote_if_better else "")
            )
        from tlcli.train import head

        evaluation = {k: evaluated[k] for k in ("accuracy", "n", "source") if k in evaluated}
        files.write_json(
            Path(trained["run"]) / "pipeline.json",
            {"config": config_record, "steps": steps_record(steps), "promoted": promote, "reason": reason},
        )
        promote_started = time.perf_counter()
        pruned = head.conclude(runs_root, trained["run"], promote, evaluation, tp["keep"], wait)
        steps.append(
            {
                "step": "promote",
                "seconds": round(time.perf_counter() - promote_started, 3),
                "did": ("promoted to latest" if promote else "not promoted")
                + f": {reason}"
                + (f"; pruned {len(pruned)} old run(s)" if pruned else ""),
                "summary": {"promoted": promote, "reason": reason, "pruned": pruned},
            }
        )
        result = {
            "config": str(config),
            "run": trained["run"],
            "promoted": promote,
            "reason": reason,
            "accuracy": evaluated["accuracy"],
            "extracted": extracted["extracted"],
            "seconds": round(time.perf_counter() - started, 3),
            "steps": steps_record(steps),
        }
    if as_json:
        emit_json(result)
    else:
        table = Table(title=f"tlcli run {config}")
        for col in ("step", "what it did", "seconds"):
            table.add_column(col, justify="right" if col == "seconds" else "left")
        for s in steps:
            table.add_row(s["step"], s["did"], f"{s['seconds']:.1f}")
        out.print(table)
        log(f"run folder {trained['run']}", quiet)
    if not promote:
        raise typer.Exit(EXIT_GATE)


@handles_errors
def runs_cmd(
    runs_root: Annotated[Path, typer.Argument(help="Runs folder, e.g. runs/pets.")],
    keep: KeepOpt = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """List the runs of a runs folder: date, data counts, accuracy, promoted or not, which is latest."""
    from tlcli.store import locks

    if not runs_root.is_dir():
        raise UsageError(f"{runs_root} is not a runs folder; train one with 'tlcli train-head --out {runs_root}'")
    pruned = []
    if keep is not None:
        with locks.lock(runs_root / LOCK_NAME, f"runs --keep is pruning {runs_root}", wait=wait):
            pruned = runs.prune(runs_root, keep)
    rows = runs.history(runs_root)
    if as_json:
        emit_json({"runs_root": str(runs_root), "runs": rows, "pruned": pruned})
        return
    table = Table(title=f"runs in {runs_root}", caption="images: train/val/test; accuracy: val, test, tlcli run's eval")
    table.add_column("run", no_wrap=True, min_width=max([len(r["run"]) for r in rows] + [3]))
    for col in ("images", "val", "test", "eval", "promoted"):
        table.add_column(col, justify="left" if col == "promoted" else "right")

    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for r in rows:
        c = r["counts"]
        table.add_row(
            r["run"],
            f"{c.get('train', '-')}/{c.get('val', '-')}/{c.get('test', '-')}",
            acc(r["val_accuracy"]),
            acc(r["test_accuracy"]),
            acc(r["evaluation_accuracy"]),
            "latest" if r["latest"] else "yes" if r["promoted"] else "no",
        )
    out.print(table)
    if pruned:
        out.print(f"pruned {len(pruned)} old never-promoted run(s): {', '.join(pruned)}")
    if not rows:
        out.print("no runs yet")
