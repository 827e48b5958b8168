"""Option types shared by the commands, and --config files as their defaults."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer

from tlcli.cli.console import _fail
from tlcli.errors import EXIT_USAGE, UsageError
from tlcli.train.recipes import AUGMENTATIONS, FINE_TUNE


def read_config(path: Path) -> dict:
    """A workflow TOML as a dict; one-line errors for a missing or invalid file."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"config {path} not found") from None
    except IsADirectoryError:
        raise UsageError(f"config {path} is a folder; give a .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config {path} is not valid TOML: {exc}") from None


def section_defaults(command, name: str, doc: dict, path: Path) -> dict:
    """The [name] table of a config as defaults for ``command``'s parameters (keys are long option names).

    Relative paths count from the project folder when the config lives in configs/, else from here.
    """
    section = doc.get(name, {})
    if not isinstance(section, dict):
        raise UsageError(f"config {path}: [{name}] must be a table")
    names = {p.name: p.name for p in command.params}
    for p in command.params:
        for opt in getattr(p, "opts", []):
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = p.name
    unknown = sorted(k for k in section if k.replace("-", "_") not in names)
    if unknown:
        raise UsageError(f"config {path}: unknown option(s) {', '.join(unknown)} in [{name}]")
    base = Path(path).resolve().parent.parent if Path(path).resolve().parent.name == "configs" else Path.cwd()
    defaults = {}
    for key, val in section.items():
        param = names[key.replace("-", "_")]
        if param in PATH_OPTIONS and isinstance(val, str) and not os.path.isabs(val):
            val = str(base / val)
        defaults[param] = val
    return defaults


def load_config(ctx: typer.Context, param, value: Optional[Path]) -> Optional[Path]:
    """--config FILE: read the command's [section] of a workflow TOML as defaults; the command line wins."""
    if value is None:
        return value
    try:
        defaults = section_defaults(ctx.command, ctx.info_name, read_config(value), value)
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


PATH_OPTIONS = {"data_dir", "out_dir", "features_dir", "run", "tensorboard", "unknowns"}


ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        help="Workflow TOML (configs/*.toml); its table named like the command gives defaults.",
        callback=load_config,
        is_eager=True,
        dir_okay=False,
    ),
]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs on stderr.")]


SeedOpt = Annotated[int, typer.Option(help="Random seed for splits, initialisation and shuffling.")]


BatchOpt = Annotated[int, typer.Option(min=1, help="Images per batch.")]


EpochsOpt = Annotated[int, typer.Option(min=1, help="Maximum epochs (early stopping on val loss).")]


LrOpt = Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")]


DropoutOpt = Annotated[float, typer.Option(min=0.0, max=0.95, help="Dropout before the softmax layer.")]


L2Opt = Annotated[float, typer.Option(min=0.0, help="L2 weight penalty of the softmax layer.")]


PatienceOpt = Annotated[int, typer.Option(min=1, help="Epochs without val improvement before stopping.")]


RefitOpt = Annotated[
    bool, typer.Option("--refit/--no-refit", help="After early stopping picks the epochs, retrain on train+val.")
]


BalanceOpt = Annotated[bool, typer.Option("--balance/--no-balance", help="Class weights against imbalance.")]


MinAccuracyOpt = Annotated[
    Optional[float], typer.Option(min=0.0, max=1.0, help="Exit 3 when accuracy is below this (CI gate).")
]


WaitOpt = Annotated[bool, typer.Option("--wait", help="If another tlcli is writing the output folder, wait for it.")]


NoLockOpt = Annotated[
    bool,
    typer.Option(
        "--no-lock",
        help="Write without locking the output folder: only on a filesystem without file locks, "
        "where no other tlcli writes at the same time.",
    ),
]


def locking(no_lock: bool) -> None:
    """Apply --no-lock to this process's locks (set on every call, so one command's choice never outlives it)."""
    from tlcli.store import locks

    locks.set_enabled(not no_lock)


def _on_off(value: str) -> str:
    if value not in ("on", "off"):
        raise typer.BadParameter(f"{value!r} is neither on nor off")
    return value


UnknownOpt = Annotated[
    str,
    typer.Option(
        callback=_on_off,
        help="on: report each photo's unknown score and call it unknown above the run's threshold; off: skip it.",
    ),
]
PromoteMinGainOpt = Annotated[
    Optional[float],
    typer.Option(
        min=0.0,
        max=1.0,
        help="With --promote-if-better: promote only if accuracy on the shared photos beats latest's by more "
        "than this (default 0: any gain).",
    ),
]
PromoteMaxPOpt = Annotated[
    Optional[float],
    typer.Option(
        min=0.0,
        max=1.0,
        help="With --promote-if-better: promote only if McNemar's p-value of the gain is at most this, e.g. 0.05 "
        "(default 1: no test).",
    ),
]


KeepOpt = Annotated[
    Optional[int],
    typer.Option(min=1, help="Afterwards delete never-promoted runs older than the newest KEEP (promoted ones stay)."),
]


TensorboardOpt = Annotated[
    Optional[Path], typer.Option(help="Write per-epoch TensorBoard scalars under this folder.", file_okay=False)
]


FineTuneOpt = Annotated[
    bool,
    typer.Option(
        "--fine-tune",
        help="After the head, train it with the whole backbone end to end on the training photos, by the "
        f"measured default recipe: every layer (BatchNorm stays frozen), {FINE_TUNE.epochs} epochs, --lr / 10 "
        f"decayed along a cosine, --augment {','.join(FINE_TUNE.augment)}; the --fine-tune-* options change it.",
    ),
]


FineTuneLayersOpt = Annotated[
    Optional[int],
    typer.Option(
        help="Fine-tune only the backbone's top N layers that hold weights (implies --fine-tune; default: all)."
    ),
]


FineTuneFromOpt = Annotated[
    Optional[str],
    typer.Option(metavar="LAYER", help="Fine-tune the backbone from this named layer up (implies --fine-tune)."),
]


FineTuneLrOpt = Annotated[
    Optional[float],
    typer.Option(help="Adam learning rate of fine-tuning, decayed to 0 along a cosine (default: --lr / 10)."),
]


FineTuneEpochsOpt = Annotated[
    Optional[int],
    typer.Option(
        help=f"Fine-tuning epochs: all of them with --refit (on train+val), at most with --no-refit "
        f"(default: {FINE_TUNE.epochs})."
    ),
]


FineTunePatienceOpt = Annotated[
    Optional[int],
    typer.Option(
        help="With --no-refit, fine-tuning epochs without val improvement before stopping "
        f"(default: {FINE_TUNE.patience})."
    ),
]


FineTuneBatchOpt = Annotated[
    Optional[int], typer.Option(help=f"Images per fine-tuning batch (default: {FINE_TUNE.batch_size}).")
]


AugmentOpt = Annotated[
    Optional[str],
    typer.Option(
        help=f"Random transforms of the fine-tuning images: any of {','.join(AUGMENTATIONS)}, or none "
        f"(default: {','.join(FINE_TUNE.augment) or 'none'})."
    ),
]


StrategyOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Distribute fine-tuning: mirrored (all local GPUs) or multiworker (the cluster in TF_CONFIG; "
        "run the same command on every worker, the chief saves the run)."
    ),
]


ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume/--no-resume",
        help="Resume an interrupted fine-tuning of the same command from its last finished epoch "
        "(--no-resume starts over).",
    ),
]


DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (a GPU if TensorFlow sees one, else CPU), cpu, gpu (all) or gpu:N.")
]


def _given(ctx: typer.Context, name: str) -> bool:
    """True when an option came from the command line or a --config file rather than its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        envvar="TLCLI_ENGINE",
        help="What runs the network: keras (TensorFlow), openvino (pip install 'tlcli[openvino]'; converted from "
        "the same model; float32 unless --precision mixed_bfloat16) or auto (extract: OpenVINO when installed and "
        "on a CPU, its conversion kept in the store; evaluate and predict: keras).",
    ),
]
