"""The tlcli command line: parse options, call one library function, print a table or JSON."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import tomllib
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tlcli import __version__, finetune, interrupts
from tlcli.errors import EXIT_FAILURE, EXIT_GATE, EXIT_INTERRUPTED, EXIT_USAGE, GateError, TlcliError, UsageError
from tlcli.head import HEAD

app = typer.Typer(
    name="tlcli",
    help="Transfer learning from the shell: pre-trained Keras backbones, a small head, your photos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(code)


def handles_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the documented exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            interrupts.check()
            return result
        except typer.Exit:
            raise
        except TlcliError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted; files already written are complete, nothing half-written was left")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except MemoryError:
            _fail("out of memory; try a smaller --batch-size", EXIT_FAILURE)
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            _fail(f"{exc.strerror or exc}{where}", EXIT_FAILURE)
        except Exception as exc:
            if os.environ.get("TLCLI_DEBUG"):
                raise
            _fail(
                f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                "(set TLCLI_DEBUG=1 for a traceback)",
                EXIT_FAILURE,
            )

    return wrapper


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


PATH_OPTIONS = {"data_dir", "out_dir", "features_dir", "run", "tensorboard"}

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
KeepOpt = Annotated[
    Optional[int],
    typer.Option(min=1, help="Afterwards delete never-promoted runs older than the newest KEEP (promoted ones stay)."),
]
TensorboardOpt = Annotated[
    Optional[Path], typer.Option(help="Write per-epoch TensorBoard scalars under this folder.", file_okay=False)
]
FINE_TUNE = finetune.Options()
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (a GPU if TensorFlow sees one, else CPU), cpu, gpu (all) or gpu:N.")
]


def use_device(device: str, quiet: bool, strategy: str | None = None) -> dict:
    """Choose devices through TensorFlow device placement before any op runs; say when auto falls back.

    A tf.distribute ``strategy`` is created here too, as a multi-worker one must precede the first op.
    """
    from tlcli import devices

    with native_stderr_silenced():
        info = devices.select(device)
        info["strategy"] = finetune.distribution(strategy) if strategy else None
        import tensorflow as tf

        tf.constant(0)
    if info["note"]:
        log(info["note"], quiet)
    return info


@contextlib.contextmanager
def progress_bar(description: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, silent with --quiet or when stderr is not a terminal."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=False,
    )
    task = progress.add_task(description, total=None)

    def update(done: int, total: int, *_) -> None:
        interrupts.check()
        progress.update(task, completed=done, total=total)

    with progress:
        yield update


def log(message: str, quiet: bool) -> None:
    if not quiet:
        err.print(message)


def emit_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Hide TensorFlow's C++ start-up chatter (it ignores TF_CPP_MIN_LOG_LEVEL before absl is initialised)."""
    if os.environ.get("TLCLI_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"tlcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Transfer learning from the shell.

    Typical flow: extract features with a frozen ImageNet backbone, train a small head on them,
    evaluate, predict. Exit codes: 0 ok, 1 failure, 2 bad usage or input, 3 quality gate not met,
    130 interrupted.
    """
    with native_stderr_silenced():
        import tensorflow  # noqa: F401


@app.command("backbones")
@handles_errors
def backbones_cmd(as_json: JsonOpt = False) -> None:
    """List every registered keras.applications backbone: default input size, feature size, parameters."""
    from tlcli import backbones

    rows = [
        {
            "name": s.name,
            "family": s.family,
            "keras": f"keras.applications.{s.constructor}",
            "input_size": s.size,
            "feature_dim": s.feature_dim,
            "params": s.params,
            "alphas": list(s.alphas),
            "preprocess": s.module,
        }
        for s in backbones.SPECS.values()
    ]
    if as_json:
        emit_json(rows)
        return
    table = Table(title="Backbones (features = pooled vector of the headless network)")
    for col in ("name", "family", "input", "features", "params", "alpha"):
        table.add_column(col, justify="right" if col in ("input", "features", "params") else "left")
    for r in rows:
        table.add_row(
            r["name"],
            r["family"],
            str(r["input_size"]),
            str(r["feature_dim"]),
            f"{r['params'] / 1e6:.1f}M",
            ",".join(f"{a:g}" for a in r["alphas"]),
        )
    out.print(table)


@app.command("devices")
@handles_errors
def devices_cmd(as_json: JsonOpt = False) -> None:
    """List the devices TensorFlow sees (CPU, GPUs) and whether this TensorFlow build can use CUDA."""
    from tlcli import devices

    with native_stderr_silenced():
        info = devices.describe()
    if as_json:
        emit_json(info)
        return
    table = Table(title=f"TensorFlow {info['tensorflow']} devices (CUDA build: {info['built_with_cuda']})")
    table.add_column("device")
    table.add_column("type")
    for d in info["devices"]:
        table.add_row(d["name"], d["type"])
    out.print(table)
    out.print("--device auto uses " + ("the GPU(s)" if info["gpus"] else "the CPU (no GPU visible)"))


def _given(ctx: typer.Context, name: str) -> bool:
    """True when an option came from the command line or a --config file rather than its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def extract_step(p: dict, progress: Callable[[int, int], None] | None) -> dict:
    """The extract step from parsed options (shared by 'tlcli extract' and 'tlcli run')."""
    from tlcli import datasets, features, shards

    return features.extract(
        p["data_dir"],
        p["out_dir"],
        backbone=p["backbone"],
        alpha=p["alpha"],
        size=p["size"],
        weights=p["weights"],
        resize=p["resize"],
        flip_average=p["flip"],
        fractions=datasets.parse_fractions(p["split"]),
        seed=p["seed"],
        batch_size=p["batch_size"],
        precision=p["precision"],
        shard=shards.parse(p["shard"]) if p["shard"] is not None else None,
        progress=progress,
        wait=p["wait"],
    )


@app.command("extract")
@handles_errors
def extract_cmd(
    ctx: typer.Context,
    data_dir: Annotated[Path, typer.Argument(help="Folder of class sub-folders (optionally with split.json).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Feature store folder to write (or update).")] = Path(
        "features/default"
    ),
    backbone: Annotated[
        str, typer.Option("--backbone", "-b", help="Backbone name (see 'tlcli backbones').")
    ] = "mobilenet",
    alpha: Annotated[Optional[float], typer.Option(help="Width multiplier for MobileNet backbones.")] = None,
    size: Annotated[Optional[int], typer.Option(min=32, help="Input size in pixels (default: the backbone's).")] = None,
    weights: Annotated[
        str, typer.Option(help="'imagenet' (Keras cache or download), 'none', or a weights FILE.")
    ] = "imagenet",
    resize: Annotated[
        str,
        typer.Option(
            help="How photos become squares: crop (centre), squash, pad, or views joined by '+' "
            "whose features are concatenated (crop+pad)."
        ),
    ] = "crop+pad",
    flip: Annotated[
        bool, typer.Option("--flip/--no-flip", help="Average features of each photo and its mirror image (2x time).")
    ] = False,
    split: Annotated[
        str, typer.Option(help="train,val,test fractions when the folder has no split.json.")
    ] = "0.8,0.1,0.1",
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 32,
    precision: Annotated[
        str,
        typer.Option(
            help="Keras mixed precision for the backbone: float32, mixed_bfloat16 or mixed_float16 (for GPUs; "
            "no faster on a CPU). Vectors are stored as float32 and the precision is part of the store's key."
        ),
    ] = "float32",
    shard: Annotated[
        Optional[str],
        typer.Option(
            help="I/N, 1 <= I <= N: worker I of N (array jobs) extracts only its files, chosen by a hash of "
            "their path, into OUT/shards/I-of-N."
        ),
    ] = None,
    merge_shards: Annotated[
        bool,
        typer.Option(
            "--merge-shards",
            help="Join the N parts under OUT/shards into OUT, as an unsharded extract would write it "
            "(options come from the parts).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    wait: WaitOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run a frozen pre-trained backbone over every image and store one feature vector each (incremental)."""
    from tlcli import datasets, features, shards

    if merge_shards:
        if shard is not None:
            raise UsageError("--shard runs one worker and --merge-shards joins their parts; give one of them")
        options = {
            "backbone": backbone,
            "alpha": alpha,
            "size": size,
            "weights": weights,
            "resize": resize,
            "flip_average": flip,
            "precision": precision,
            "fractions": datasets.parse_fractions(split),
            "seed": seed,
        }
        option_name = {"flip_average": "flip", "fractions": "split"}
        given = {k: v for k, v in options.items() if _given(ctx, option_name.get(k, k))}
        summary = features.merge_shards(data_dir, out_dir, wait=wait, **given)
    else:
        if shard is not None:
            shards.parse(shard)
        use_device(device, quiet or as_json)
        with progress_bar("extracting", quiet or as_json) as bar:
            summary = extract_step(ctx.params, bar)
    if as_json:
        emit_json(summary)
        return
    s = summary["splits"]
    merged = f"merged {summary['merged']} shards: " if merge_shards else ""
    out.print(
        merged
        + f"{summary['stored']} images -> {summary['out']} ({summary['key']}): train {s['train']}, val {s['val']}, "
        f"test {s['test']}; extracted {summary['extracted']}, reused {summary['reused']}, "
        f"skipped {len(summary['skipped'])} "
        f"in {summary['seconds']:.1f}s"
    )
    if summary["replaced_key"]:
        out.print(f"replaced features made by {summary['replaced_key']}")
    for item in summary["skipped"][:20]:
        err.print(f"skipped {item['path']}: {item['reason']}", markup=False)
    if len(summary["skipped"]) > 20:
        err.print(f"... and {len(summary['skipped']) - 20} more (see {summary['out']}/meta.json)")
    if summary["empty_classes"]:
        err.print(f"ignored empty class folder(s): {', '.join(summary['empty_classes'])}", markup=False)


def fine_tune_options(p: dict) -> finetune.Options | None:
    """The fine-tuning options of parsed train-head options (None: head only)."""
    return finetune.options(
        p["fine_tune_layers"],
        p["fine_tune_from"],
        p["fine_tune_lr"],
        p["fine_tune_epochs"],
        p["fine_tune_patience"],
        p["fine_tune_batch_size"],
        p["augment"],
        p["strategy"],
    )


def train_step(p: dict, progress: Callable[[int, int, dict], None] | None, **extra) -> dict:
    """The train-head step from parsed options (shared by 'tlcli train-head' and 'tlcli run')."""
    from tlcli import head

    return head.train(
        p["features_dir"],
        p["out_dir"],
        epochs=p["epochs"],
        batch_size=p["batch_size"],
        learning_rate=p["lr"],
        dropout=p["dropout"],
        l2=p["l2"],
        patience=p["patience"],
        balance=p["balance"],
        refit=p["refit"],
        seed=p["seed"],
        promote_if_better=p["promote_if_better"],
        backbone=p["backbone"],
        size=p["size"],
        keep=p["keep"],
        tensorboard=p["tensorboard"],
        fine_tune=fine_tune_options(p),
        progress=progress,
        wait=p["wait"],
        **extra,
    )


@app.command("train-head")
@handles_errors
def train_head_cmd(
    ctx: typer.Context,
    features_dir: Annotated[Path, typer.Argument(help="Feature store written by 'tlcli extract'.")],
    out_dir: Annotated[
        Path,
        typer.Option("--out", "-o", help="Runs folder: each run goes to OUT/<timestamp>/, OUT/latest is promoted."),
    ] = Path("runs/default"),
    epochs: EpochsOpt = HEAD.epochs,
    batch_size: BatchOpt = HEAD.batch_size,
    lr: LrOpt = HEAD.learning_rate,
    dropout: DropoutOpt = HEAD.dropout,
    l2: L2Opt = HEAD.l2,
    patience: PatienceOpt = HEAD.patience,
    refit: RefitOpt = HEAD.refit,
    balance: BalanceOpt = HEAD.balance,
    promote_if_better: Annotated[
        bool, typer.Option(help="Promote to latest only if val accuracy beats it (else exit 3).")
    ] = False,
    backbone: Annotated[Optional[str], typer.Option(help="Refuse features not made by this backbone.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Refuse features not made at this input size.")] = None,
    keep: KeepOpt = None,
    tensorboard: TensorboardOpt = None,
    fine_tune_layers: Annotated[
        Optional[int],
        typer.Option(
            help="Fine-tune: after the head, train the backbone's top N layers that hold weights with it, end "
            "to end on the training images (BatchNorm stays frozen, in inference mode)."
        ),
    ] = None,
    fine_tune_from: Annotated[
        Optional[str], typer.Option(metavar="LAYER", help="Fine-tune the backbone from this named layer up.")
    ] = None,
    fine_tune_lr: Annotated[
        Optional[float],
        typer.Option(help="Adam learning rate of fine-tuning, decayed to 0 along a cosine (default: --lr / 10)."),
    ] = None,
    fine_tune_epochs: Annotated[
        Optional[int],
        typer.Option(
            help=f"Fine-tuning epochs: all of them with --refit (on train+val), at most with --no-refit "
            f"(default: {FINE_TUNE.epochs})."
        ),
    ] = None,
    fine_tune_patience: Annotated[
        Optional[int],
        typer.Option(
            help="With --no-refit, fine-tuning epochs without val improvement before stopping "
            f"(default: {FINE_TUNE.patience})."
        ),
    ] = None,
    fine_tune_batch_size: Annotated[
        Optional[int], typer.Option(help=f"Images per fine-tuning batch (default: {FINE_TUNE.batch_size}).")
    ] = None,
    augment: Annotated[
        Optional[str],
        typer.Option(
            help="Random transforms of the fine-tuning images: any of flip,rotate,zoom,contrast, or none "
            f"(default: {','.join(FINE_TUNE.augment) or 'none'})."
        ),
    ] = None,
    strategy: Annotated[
        Optional[str],
        typer.Option(
            help="Distribute fine-tuning: mirrored (all local GPUs) or multiworker (the cluster in TF_CONFIG; "
            "run the same command on every worker, the chief saves the run)."
        ),
    ] = None,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    wait: WaitOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Train a softmax head on stored features, optionally fine-tune the backbone; save one pixels-in model."""
    fine_tune = fine_tune_options(ctx.params)
    info = use_device(device, quiet or as_json, fine_tune.strategy if fine_tune else None)
    with progress_bar(
        "training head, then fine-tuning (epochs)" if fine_tune else "training head (epochs)", quiet or as_json
    ) as bar:
        summary = train_step(ctx.params, bar, strategy=info["strategy"])
    if summary["run"] is None:
        if as_json:
            emit_json(summary)
        else:
            out.print(f"worker {summary['worker']}: {summary['note']}")
        return
    if as_json:
        emit_json(summary)
    else:
        test = summary["test_accuracy"]
        out.print(
            f"run {summary['run']}: train {summary['train_accuracy']:.4f}, val {summary['val_accuracy']:.4f}"
            + (f", test {test:.4f}" if test is not None else "")
            + f" after {summary['epochs_run']} head epochs"
            + (f" and {summary['fine_tune_epochs_run']} fine-tuning epochs" if fine_tune else "")
            + f" ({summary['fit_seconds']:.1f}s)"
        )
        if fine_tune and summary["fine_tune_best_epoch"] == 0:
            ran = summary["fine_tune_epochs_run"]
            out.print(
                f"fine-tuning never beat the head-only start on val loss in {ran} epoch{'s' if ran != 1 else ''}; "
                "the run keeps the head-only weights (try another --fine-tune-lr or more --fine-tune-patience)"
            )
        out.print(
            f"promoted to {summary['latest']}"
            if summary["promoted"]
            else f"not promoted: val {summary['val_accuracy']:.4f} does not beat "
            f"latest {summary['previous_val_accuracy']:.4f}"
        )
        if summary["pruned"]:
            out.print(f"pruned {len(summary['pruned'])} old never-promoted run(s): {', '.join(summary['pruned'])}")
    if not summary["promoted"]:
        raise typer.Exit(EXIT_GATE)


def _per_class_table(result: dict) -> Table:
    table = Table(title=f"{result['source']}: accuracy {result['accuracy']:.4f} on {result['n']} images")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, c in result["per_class"].items():
        table.add_row(name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
    return table


def _gate(result: dict, min_accuracy: float | None) -> bool:
    """Record ``--min-accuracy`` and whether ``result`` passed it; True when the gate failed."""
    failed = min_accuracy is not None and result["accuracy"] < min_accuracy
    result.update(min_accuracy=min_accuracy, passed=not failed)
    return failed


def evaluate_step(p: dict, progress: Callable[[int, int], None] | None) -> dict:
    """The evaluate step from parsed options (shared by 'tlcli evaluate' and 'tlcli run')."""
    from tlcli import evaluate

    return evaluate.evaluate_run(
        p["run"], p["data_dir"], top_k=p["top_k"], out=p["out_dir"], batch_size=p["batch_size"], progress=progress
    )


@app.command("evaluate")
@handles_errors
def evaluate_cmd(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(help="Run folder, e.g. runs/pets/latest.")],
    data_dir: Annotated[
        Optional[Path], typer.Argument(help="Folder of class sub-folders (default: the run's test split).")
    ] = None,
    min_accuracy: MinAccuracyOpt = None,
    top_k: Annotated[int, typer.Option(min=1, help="Also report top-k accuracy.")] = 5,
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Where to write metrics.json, confusion.png, misclassified.json."),
    ] = None,
    batch_size: BatchOpt = 32,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Accuracy, top-k, per-class precision/recall/F1, confusion matrix and misclassified files."""
    use_device(device, quiet or as_json)
    with progress_bar("evaluating", quiet or as_json) as bar:
        result = evaluate_step(ctx.params, bar)
    gate_failed = _gate(result, min_accuracy)
    if as_json:
        emit_json({k: v for k, v in result.items() if k != "confusion"})
    else:
        out.print(_per_class_table(result))
        topk = next(k for k in result if k.startswith("top_"))
        out.print(
            f"accuracy {result['accuracy']:.4f}, {topk.replace('_', '-')} {result[topk]:.4f}, "
            f"{len(result['misclassified'])} misclassified; files in {result['out']}"
        )
        for item in result["skipped"]:
            err.print(f"skipped {item['path']}: {item['reason']}", markup=False)
    if gate_failed:
        raise GateError(f"accuracy {result['accuracy']:.4f} is below --min-accuracy {min_accuracy}")


@app.command("cross-validate")
@handles_errors
def cross_validate_cmd(
    ctx: typer.Context,
    features_dir: Annotated[Path, typer.Argument(help="Feature store written by 'tlcli extract'.")],
    folds: Annotated[int, typer.Option(min=3, help="Folds: each photo is held out once.")] = 10,
    min_accuracy: MinAccuracyOpt = None,
    epochs: EpochsOpt = HEAD.epochs,
    batch_size: BatchOpt = HEAD.batch_size,
    lr: LrOpt = HEAD.learning_rate,
    dropout: DropoutOpt = HEAD.dropout,
    l2: L2Opt = HEAD.l2,
    patience: PatienceOpt = HEAD.patience,
    refit: RefitOpt = HEAD.refit,
    balance: BalanceOpt = HEAD.balance,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Accuracy of train-head's recipe measured on every stored photo: k heads, each tested on the fold it did not see.

    Writes nothing; use it to compare options, or as a CI gate, when one test split is too small to tell.
    """
    from tlcli import crossval

    use_device(device, quiet or as_json)
    with progress_bar("cross-validating (folds)", quiet or as_json) as bar:
        result = crossval.cross_validate(
            features_dir,
            folds=folds,
            seed=seed,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=lr,
            dropout=dropout,
            l2=l2,
            patience=patience,
            balance=balance,
            refit=refit,
            progress=bar,
        )
    gate_failed = _gate(result, min_accuracy)
    if as_json:
        emit_json({k: v for k, v in result.items() if k != "confusion"})
    else:
        out.print(_per_class_table(result))
        out.print(
            f"accuracy {result['accuracy']:.4f} on {result['n']} held-out images "
            f"(per fold {', '.join(f'{a:.3f}' for a in result['per_fold'])}; std {result['fold_std']:.3f}), "
            f"{len(result['misclassified'])} misclassified, {result['seconds']:.1f}s"
        )
    if gate_failed:
        raise GateError(f"cross-validated accuracy {result['accuracy']:.4f} is below --min-accuracy {min_accuracy}")


@app.command("predict")
@handles_errors
def predict_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder, e.g. runs/pets/latest.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to show per image.")] = 3,
    batch_size: BatchOpt = 32,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Classify photos: a top-k table, or one JSON object per line with --json."""
    from tlcli import predict

    use_device(device, quiet or as_json)
    with progress_bar("predicting", quiet or as_json) as bar:
        rows, skipped = predict.predict_paths(
            run, [str(p) for p in paths], top_k=top_k, batch_size=batch_size, progress=bar
        )
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        for item in skipped:
            sys.stdout.write(json.dumps({"path": item["path"], "error": item["reason"]}) + "\n")
        sys.stdout.flush()
    else:
        table = Table()
        table.add_column("file")
        for i in range(min(top_k, len(rows[0]["top"]) if rows else top_k)):
            table.add_column(f"#{i + 1}")
        for row in rows:
            table.add_row(row["path"], *[f"{t['class']} {t['probability']:.3f}" for t in row["top"]])
        out.print(table)
        for item in skipped:
            err.print(f"skipped {item['path']}: {item['reason']}", markup=False)
    if not rows:
        raise UsageError("no image could be read; check the paths")


@app.command("export")
@handles_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder, e.g. runs/pets/latest.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="model.tflite file or SavedModel folder.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="tflite or savedmodel.")] = "tflite",
    quantize: Annotated[
        str,
        typer.Option(
            help="tflite: none, dynamic (int8 weights), float16, or int8 (full integer, calibrated "
            "on the run's images)."
        ),
    ] = "none",
    check_images: Annotated[
        int, typer.Option(min=1, help="Images to compare the export with the Keras model on.")
    ] = 32,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a run as TFLite or SavedModel (labels beside it), checked against the Keras model first."""
    from tlcli import export

    use_device(device, quiet or as_json)
    with native_stderr_silenced():
        summary = export.export(run_dir, out_path, fmt, quantize, check_images)
    if as_json:
        emit_json(summary)
        return
    out.print(
        f"wrote {', '.join(summary['files'])} ({summary['bytes'] / 1e6:.1f} MB); on {summary['checked_images']} images "
        f"top-1 agrees with Keras {summary['top1_agreement']:.1%}, max probability difference "
        f"{summary['max_probability_difference']:.4f}"
    )


def run() -> None:
    """Console-script entry point: SIGTERM (cron timeouts, docker stop, kill) stops like Ctrl-C, exit 130."""
    interrupts.install()
    app()


from tlcli import attack_cli, fetch_cli, run_cli, visualize_cli  # noqa: E402,F401
