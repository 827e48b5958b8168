"""`tlcli run CONFIG` (fetch-data -> extract -> train-head -> evaluate -> promote, for cron) and `tlcli runs`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tlcli import pipeline
from tlcli.cli import data, evaluate, extract, train
from tlcli.cli.console import emit_json, err, handles_errors, log, out, progress_bar, use_device
from tlcli.cli.evaluate import evaluate_step
from tlcli.cli.extract import extract_step
from tlcli.cli.options import (
    DeviceOpt,
    JsonOpt,
    KeepOpt,
    NoLockOpt,
    PromoteMaxPOpt,
    PromoteMinGainOpt,
    QuietOpt,
    TensorboardOpt,
    WaitOpt,
    locking,
    read_config,
    section_defaults,
)
from tlcli.cli.train import train_step
from tlcli.errors import EXIT_GATE, UsageError
from tlcli.store import runs
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


def _check_tables(config: Path, doc: dict) -> None:
    missing = [s for s in ("extract", "train-head") if s not in doc]
    if missing:
        raise UsageError(f"config {config} has no [{'], ['.join(missing)}] table; see configs/cats_vs_dogs.toml")
    unknown = sorted(set(doc) - set(STEPS))
    if unknown:
        raise UsageError(f"config {config}: unknown table(s) [{'], ['.join(unknown)}]; known: {', '.join(STEPS)}")


def plan(
    config: Path,
    doc: dict,
    *,
    promote_if_better: bool,
    seed: int | None,
    keep: int | None,
    tensorboard: Path | None,
    wait: bool,
    promote_rule: dict | None = None,
    backbone: dict | None = None,
) -> pipeline.Plan:
    """The pipeline of a workflow config: each step's function with its table parsed as its command would,
    and the options of 'tlcli run' itself over them."""
    _check_tables(config, doc)
    common = {"wait": wait, "quiet": True, "as_json": True, **({"seed": seed} if seed is not None else {})}
    fp = parse_step("fetch-data", doc, config, common) if "fetch-data" in doc else None
    if fp is not None and not fp["source"]:
        raise UsageError(f"config {config} [fetch-data] needs source = a dataset name, URL, archive or folder")
    data_from_fetch = fp is not None and "data_dir" not in doc["extract"]
    chosen = {k: v for k, v in (backbone or {}).items() if v is not None}
    ep = parse_step("extract", doc, config, {**common, **chosen, **({"data_dir": "."} if data_from_fetch else {})})
    if ep["shard"] is not None or ep["merge_shards"]:
        raise UsageError(f"config {config} [extract]: tlcli run extracts the whole folder; drop shard/merge_shards")
    options = {"keep": keep, "tensorboard": tensorboard, **(promote_rule or {})}
    given = {k: v for k, v in options.items() if v is not None}
    tp = parse_step(
        "train-head",
        doc,
        config,
        {**common, "features_dir": ep["out_dir"], "promote_if_better": promote_if_better, **given},
    )
    vp = parse_step("evaluate", doc, config, {**common, "run": tp["out_dir"]})
    return pipeline.Plan(
        extract=pipeline.Step(extract_step, ep),
        train=pipeline.Step(train_step, tp),
        evaluate=pipeline.Step(evaluate_step, vp),
        fetch=pipeline.Step(data.fetch_step, fp) if fp is not None else None,
        extract_fetched=data_from_fetch,
        config=pipeline.record_config(config, doc, promote_if_better=promote_if_better, seed=seed, keep=keep, **chosen),
        promote_if_better=promote_if_better,
        wait=wait,
    )


def _steps_table(config: Path, outcome: pipeline.Outcome) -> Table:
    table = Table(title=f"tlcli run {config}")
    for col in ("step", "what it did", "seconds"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for s in outcome.steps:
        table.add_row(s["step"], s["did"], f"{s['seconds']:.1f}")
    return table


@handles_errors
def run_cmd(
    *,
    config: Annotated[Path, typer.Argument(help="Workflow TOML (configs/*.toml) with [extract], [train-head], ...")],
    promote_if_better: Annotated[
        bool,
        typer.Option(help="Promote only if better than latest on the same photos (val photos it never trained on)."),
    ] = False,
    promote_min_gain: PromoteMinGainOpt = None,
    promote_max_p: PromoteMaxPOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for every step (default: each step's config).")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="Extract with this backbone, not the config's.")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="MobileNet width multiplier, over the config's.")] = None,
    keep: KeepOpt = None,
    tensorboard: TensorboardOpt = None,
    as_json: JsonOpt = False,
    wait: WaitOpt = False,
    no_lock: NoLockOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Fetch (if the config names a dataset), extract (incremental), train a head, evaluate, promote.

    Each step is the same code as its subcommand, with options from the config's [fetch-data],
    [extract], [train-head] and [evaluate] tables. The new run becomes latest only if it passes
    [evaluate] min_accuracy and, with --promote-if-better, beats latest on the same val photos; otherwise
    it is kept but not promoted and the exit code is 3. Cron: `tlcli run CONFIG --promote-if-better --json`.
    """
    steps = plan(
        config,
        read_config(config),
        promote_if_better=promote_if_better,
        seed=seed,
        keep=keep,
        tensorboard=tensorboard,
        wait=wait,
        promote_rule={"promote_min_gain": promote_min_gain, "promote_max_p": promote_max_p},
        backbone={"backbone": backbone, "alpha": alpha},
    )
    locking(no_lock)
    quiet = quiet or as_json
    use_device(device, quiet)
    outcome = pipeline.run(
        steps, bars=lambda description: progress_bar(description, quiet), say=lambda m: err.print(m, markup=False)
    )
    if as_json:
        emit_json({"config": str(config), **dataclasses.asdict(outcome)}, compact=True)
    else:
        out.print(_steps_table(config, outcome))
        log(f"run folder {outcome.run}", quiet)
    if not outcome.promoted:
        raise typer.Exit(EXIT_GATE)


@handles_errors
def runs_cmd(
    *,
    runs_root: Annotated[Path, typer.Argument(help="Runs folder, e.g. runs/pets.")],
    keep: KeepOpt = None,
    wait: WaitOpt = False,
    no_lock: NoLockOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """List the runs of a runs folder: date, data counts, accuracy, promoted or not, which is latest."""
    from tlcli.store import locks

    locking(no_lock)
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
