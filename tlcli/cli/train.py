"""tlcli train-head and tlcli cross-validate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from tlcli.cli.console import emit_json, handles_errors, out, progress_bar, use_device
from tlcli.cli.evaluate import passes_gate, per_class_table
from tlcli.cli.options import (
    AugmentOpt,
    BalanceOpt,
    BatchOpt,
    ConfigOpt,
    DeviceOpt,
    DropoutOpt,
    EpochsOpt,
    FineTuneBatchOpt,
    FineTuneEpochsOpt,
    FineTuneFromOpt,
    FineTuneLayersOpt,
    FineTuneLrOpt,
    FineTuneOpt,
    FineTunePatienceOpt,
    JsonOpt,
    KeepOpt,
    L2Opt,
    LrOpt,
    MinAccuracyOpt,
    NoLockOpt,
    PatienceOpt,
    PromoteMaxPOpt,
    PromoteMinGainOpt,
    QuietOpt,
    RefitOpt,
    ResumeOpt,
    SeedOpt,
    StrategyOpt,
    TensorboardOpt,
    WaitOpt,
    locking,
)
from tlcli.errors import EXIT_GATE, GateError
from tlcli.train.recipes import HEAD, HeadRecipe, fine_tune_from_options, from_options

if TYPE_CHECKING:
    from tlcli.train.trainer import Trained


def train_step(p: dict, progress: Callable[[int, int, dict], None] | None, **extra) -> Trained:
    """The train-head step from parsed options (shared by 'tlcli train-head' and 'tlcli run')."""
    from tlcli.train import promotion, trainer

    rule = promotion.Rule(p["promote_min_gain"] or 0.0, 1.0 if p["promote_max_p"] is None else p["promote_max_p"])
    return trainer.train(
        p["features_dir"],
        p["out_dir"],
        from_options(HeadRecipe, p),
        fine_tune=fine_tune_from_options(p),
        promote_if_better=p["promote_if_better"],
        promote_rule=rule,
        backbone=p["backbone"],
        size=p["size"],
        keep=p["keep"],
        tensorboard=p["tensorboard"],
        progress=progress,
        wait=p["wait"],
        resume=p["resume"],
        **extra,
    )


def _print_trained(trained: Trained) -> None:
    """train-head's lines: the run's scores, whether fine-tuning helped, promotion and pruning."""
    tuned = trained.fine_tune_epochs_run is not None
    test = trained.test_accuracy
    out.print(
        f"run {trained.run}: train {trained.train_accuracy:.4f}, val {trained.val_accuracy:.4f}"
        + (f", test {test:.4f}" if test is not None else "")
        + f" after {trained.epochs_run} head epochs"
        + (f" and {trained.fine_tune_epochs_run} fine-tuning epochs" if tuned else "")
        + f" ({trained.fit_seconds:.1f}s)"
    )
    if tuned and trained.fine_tune_best_epoch == 0:
        ran = trained.fine_tune_epochs_run
        out.print(
            f"fine-tuning never beat the head-only start on val loss in {ran} epoch{'s' if ran != 1 else ''}; "
            "the run keeps the head-only weights (try another --fine-tune-lr or more --fine-tune-patience)"
        )
    c = trained.comparison
    shared = f" (on the same {c['photos']} photos: {c['new_accuracy']:.4f} vs {c['latest_accuracy']:.4f})" if c else ""
    out.print(f"promoted to {trained.latest}{shared}" if trained.promoted else f"not promoted: {trained.not_better()}")
    if trained.pruned:
        out.print(f"pruned {len(trained.pruned)} old never-promoted run(s): {', '.join(trained.pruned)}")


@handles_errors
def train_head_cmd(
    ctx: typer.Context,
    *,
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
    balance: BalanceOpt = HEAD.class_weights,
    promote_if_better: Annotated[
        bool,
        typer.Option(
            help="Promote to latest only if better on the same photos: val photos latest did not train on (else "
            "exit 3)."
        ),
    ] = False,
    promote_min_gain: PromoteMinGainOpt = None,
    promote_max_p: PromoteMaxPOpt = None,
    backbone: Annotated[Optional[str], typer.Option(help="Refuse features not made by this backbone.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Refuse features not made at this input size.")] = None,
    keep: KeepOpt = None,
    tensorboard: TensorboardOpt = None,
    fine_tune: FineTuneOpt = False,
    fine_tune_layers: FineTuneLayersOpt = None,
    fine_tune_from: FineTuneFromOpt = None,
    fine_tune_lr: FineTuneLrOpt = None,
    fine_tune_epochs: FineTuneEpochsOpt = None,
    fine_tune_patience: FineTunePatienceOpt = None,
    fine_tune_batch_size: FineTuneBatchOpt = None,
    augment: AugmentOpt = None,
    strategy: StrategyOpt = None,
    resume: ResumeOpt = True,
    seed: SeedOpt = HEAD.seed,
    as_json: JsonOpt = False,
    wait: WaitOpt = False,
    no_lock: NoLockOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Train a softmax head on stored features, optionally fine-tune the backbone; save one pixels-in model."""
    locking(no_lock)
    tuning = fine_tune_from_options(ctx.params)
    info = use_device(device, quiet or as_json, tuning.strategy if tuning else None)
    with progress_bar(
        "training head, then fine-tuning (epochs)" if tuning else "training head (epochs)", quiet or as_json
    ) as bar:
        trained = train_step(ctx.params, bar, strategy=info["strategy"])
    if as_json:
        emit_json(trained.summary())
    elif trained.run is None:
        out.print(f"worker {trained.worker}: {trained.summary()['note']}")
    else:
        _print_trained(trained)
    if trained.run is not None and not trained.promoted:
        raise typer.Exit(EXIT_GATE)


@handles_errors
def cross_validate_cmd(
    ctx: typer.Context,
    *,
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
    balance: BalanceOpt = HEAD.class_weights,
    fine_tune: FineTuneOpt = False,
    fine_tune_layers: FineTuneLayersOpt = None,
    fine_tune_from: FineTuneFromOpt = None,
    fine_tune_lr: FineTuneLrOpt = None,
    fine_tune_epochs: FineTuneEpochsOpt = None,
    fine_tune_batch_size: FineTuneBatchOpt = None,
    augment: AugmentOpt = None,
    seed: SeedOpt = HEAD.seed,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Accuracy of train-head's recipe measured on every stored photo: k heads, each tested on the fold it did not see.

    Writes nothing; use it to compare options, or as a CI gate, when one test split is too small to tell. With
    --fine-tune, each fold's head is fine-tuned too (minutes a fold), and the gain over the head is reported.
    """
    from tlcli.train import crossval

    tuning = fine_tune_from_options(ctx.params)
    use_device(device, quiet or as_json)
    with progress_bar("cross-validating (folds)", quiet or as_json) as bar:
        result = crossval.cross_validate(
            features_dir, from_options(HeadRecipe, ctx.params), fine_tune=tuning, folds=folds, progress=bar
        )
    gate_failed = passes_gate(result, min_accuracy)
    if as_json:
        emit_json(result)
    else:
        out.print(per_class_table(result))
        out.print(
            f"accuracy {result['accuracy']:.4f} on {result['n']} held-out images "
            f"(per fold {', '.join(f'{a:.3f}' for a in result['per_fold'])}; std {result['fold_std']:.3f}), "
            f"{len(result['misclassified'])} misclassified, {result['seconds']:.1f}s"
        )
        if tuning:
            h = result["head_only"]
            out.print(
                f"head only {h['accuracy']:.4f} on the same folds ({', '.join(f'{a:.3f}' for a in h['per_fold'])}): "
                f"fine-tuning gains {100 * result['gain']:+.1f} points"
            )
    if gate_failed:
        raise GateError(f"cross-validated accuracy {result['accuracy']:.4f} is below --min-accuracy {min_accuracy}")
