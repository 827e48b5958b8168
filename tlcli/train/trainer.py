"""A train-head run as named steps: load the store's splits, fit (the head, then optionally fine-tuning),
score, judge against the promoted run, describe the run, write it, promote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tlcli.errors import UsageError
from tlcli.models import backbones
from tlcli.models.run import pixels_model
from tlcli.store import files, locks, runs
from tlcli.store.features import Split, Store
from tlcli.store.locks import LOCK_NAME
from tlcli.train import distribute, finetune, metrics, plots, report
from tlcli.train.head import Progress, class_weights, fit_and_refit
from tlcli.train.recipes import HEAD, FineTuneRecipe, HeadRecipe

WORKER_NOTE = "trained as a worker of the cluster; its chief saves the run"


class RunLog:
    """Timestamped lines of what a training run did and decided, saved as train.log in the run folder."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(f"{datetime.now(UTC).isoformat(timespec='milliseconds')}  {message}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _summary_writer(tensorboard: Path | None):
    """A TensorBoard writer into ``tensorboard`` (the run's own folder there), or None without one."""
    if not tensorboard:
        return None
    import tensorflow as tf

    try:
        import tensorboard as _  # noqa: F401  (tf.summary's scalar writer lives in this package)
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'tlcli[tensorboard]'") from None
    return tf.summary.create_file_writer(str(tensorboard))


def _epoch_observer(progress: Progress | None, writer, log: RunLog, prefix: str = "") -> Progress:
    """Per-epoch hook: progress bar, TensorBoard scalars (named ``prefix`` + metric), a log line every 10 epochs."""
    import tensorflow as tf

    def on_epoch(done: int, total: int, last: dict) -> None:
        if writer is not None:
            with writer.as_default():
                for name, value in last.items():
                    tf.summary.scalar(prefix + name, value, step=done)
            writer.flush()
        if done % 10 == 0 or done == 1:
            log(f"{prefix}epoch {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
        if progress:
            progress(done, total, last)

    return on_epoch


@dataclass(frozen=True)
class Features:
    """The feature store a run trains on: its metadata and its three splits."""

    path: Path
    meta: dict
    train: Split
    val: Split
    test: Split

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def has_val(self) -> bool:
        return len(self.val.labels) > 0


def _check_expectations(meta: dict, backbone: str | None, size: int | None) -> None:
    if backbone and backbones.spec(backbone).name != meta["backbone"]:
        raise UsageError(
            f"these features were made by {meta['backbone']}, not {backbones.spec(backbone).name}; "
            f"re-run 'tlcli extract' with --backbone {backbones.spec(backbone).name} into another --out"
        )
    if size and size != meta["input_size"]:
        raise UsageError(
            f"these features were made at input size {meta['input_size']}, not {size}; "
            f"re-run 'tlcli extract' with --size {size}"
        )


def load_features(
    features_dir: str | os.PathLike,
    *,
    backbone: str | None = None,
    size: int | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Features:
    """The store's splits, refused when not made by ``backbone`` at ``size`` or unable to train a classifier."""
    store = Store.open(features_dir)
    _check_expectations(store.meta, backbone, size)
    features = Features(Path(features_dir), store.meta, *(store.split(s) for s in ("train", "val", "test")))
    if len(features.train.labels) == 0:
        raise UsageError(f"{features_dir} has no training images; add images and re-run 'tlcli extract'")
    if len(np.unique(features.train.labels)) < 2:
        raise UsageError("the training split holds a single class; a classifier needs at least two")
    t, v, s = (len(x.labels) for x in (features.train, features.val, features.test))
    log(
        f"features {features.path.resolve()} ({store.meta['key']}): train {t}, val {v}, test {s} images, "
        f"{len(features.classes)} classes"
    )
    return features


@dataclass(frozen=True)
class Fitted:
    """The trained pixels-in model and how it was trained: the recipes (fine-tuning's resolved) and histories."""

    model: object
    head: object
    recipe: HeadRecipe
    history: dict[str, list[float]]
    val_probs: np.ndarray | None
    fine_tune: FineTuneRecipe | None = None
    tuned: finetune.Result | None = None
    replicas: int = 1
    seconds: float = 0.0

    @property
    def refit_epochs(self) -> int | None:
        return len(self.history["refit_loss"]) if "refit_loss" in self.history else None

    def histories(self, flat: bool = False) -> dict[str, list[float]]:
        """The head's history, with fine-tuning's nested under ``fine_tune`` (or ``flat``: as ``fine_tune_*``)."""
        if self.tuned is None:
            return self.history
        if flat:
            return {**self.history, **{f"fine_tune_{k}": v for k, v in self.tuned.history.items()}}
        return {**self.history, "fine_tune": self.tuned.history}


def _fine_tune(
    features: Features,
    fitted: Fitted,
    recipe: FineTuneRecipe,
    *,
    strategy,
    progress: Progress | None,
    log: RunLog,
    checkpoint: runs.Checkpoint | None = None,
) -> Fitted:
    """Put the trained head on the backbone and train the recipe's top layers with it, end to end on the photos.

    Like the head's refit: after one, fine-tune on train+val for every epoch; without, stop early on val.
    """
    import keras

    def build():
        copy = keras.models.clone_model(fitted.head)
        copy.set_weights(fitted.head.get_weights())
        return pixels_model(features.meta, copy)

    tune_on, stop_on = (
        (Split.joined([features.train, features.val]), None)
        if fitted.refit_epochs
        else (features.train, features.val if features.has_val else None)
    )
    keras.utils.set_random_seed(fitted.recipe.seed)
    n_classes = len(features.classes)
    tuned = finetune.fine_tune(
        build,
        finetune.Photos.of(features.meta),
        tune_on,
        stop_on,
        recipe,
        class_weights=class_weights(tune_on.labels, n_classes) if fitted.recipe.class_weights else None,
        seed=fitted.recipe.seed,
        strategy=strategy,
        progress=progress,
        checkpoint=checkpoint,
    )
    if tuned.resumed_from:
        log(f"resumed fine-tuning after epoch {tuned.resumed_from} from {checkpoint.path}")
    log(
        f"fine-tuned {len(tuned.unfrozen)} layers on {len(tune_on.labels)} images for {len(tuned.history['loss'])} "
        f"epochs at lr {recipe.learning_rate:g} (cosine decay); "
        + (
            f"kept epoch {tuned.best_epoch}"
            if tuned.best_epoch
            else "no epoch beat the head-only start, whose weights are kept"
        )
    )
    replicas = strategy.num_replicas_in_sync if strategy else 1
    return dataclasses.replace(fitted, model=tuned.model, fine_tune=recipe, tuned=tuned, replicas=replicas)


def fit(
    features: Features,
    recipe: HeadRecipe,
    fine_tune: FineTuneRecipe | None = None,
    *,
    strategy=None,
    progress: Progress | None = None,
    tensorboard: str | os.PathLike | None = None,
    log: RunLog,
    checkpoint: runs.Checkpoint | None = None,
) -> Fitted:
    """The head on the stored features, then (with ``fine_tune``) the backbone's top layers with it on the photos;
    each epoch's scores go to TensorBoard folder ``tensorboard`` (the fine-tuning's as ``fine_tune_*``)."""
    started = time.perf_counter()
    r = recipe
    log(
        f"head: dropout {r.dropout}, l2 {r.l2}, lr {r.learning_rate}, batch {r.batch_size}, "
        f"epochs <= {r.epochs}, seed {r.seed}"
    )
    writer = _summary_writer(tensorboard)
    on_epoch = _epoch_observer(progress, writer, log)
    head, history, val_probs = fit_and_refit(
        features.train, features.val, len(features.classes), recipe, on_epoch=on_epoch, log=log
    )
    fitted = Fitted(None, head, recipe, history, val_probs)
    if fine_tune is None:
        fitted = dataclasses.replace(fitted, model=pixels_model(features.meta, head).model)
    else:
        tuning = _epoch_observer(progress, writer, log, prefix="fine_tune_")
        fitted = _fine_tune(
            features,
            fitted,
            fine_tune.resolved(recipe),
            strategy=strategy,
            progress=tuning,
            log=log,
            checkpoint=checkpoint,
        )
    return dataclasses.replace(fitted, seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class Scores:
    """Metrics of the fitted model on each split; ``val`` None without val images. ``test_photos``: the test
    photos to look at (``misclassified`` and ``least_confident`` records, each written as a JSON file)."""

    train: float
    val: dict | None
    test: dict
    test_photos: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def val_accuracy(self) -> float:
        return self.val["accuracy"] if self.val else self.train

    @property
    def test_accuracy(self) -> float | None:
        return self.test["accuracy"] if self.test["n"] else None

    def accuracies(self) -> dict[str, float | None]:
        return {"train_accuracy": self.train, "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy}


def _predictions(features: Features, fitted: Fitted, split: Split) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Probabilities, labels and photo paths of one split: the head on its stored features, a fine-tuned model on
    its photos' views (the pixels its features were extracted from, which the saved model's own views match to
    8-bit rounding)."""
    photos = finetune.Photos.of(features.meta)
    if not len(split.labels):
        return np.zeros((0, len(features.classes))), split.labels, []
    if fitted.tuned is None:
        return fitted.head.predict(split.features, verbose=0, batch_size=256), split.labels, photos.paths(split)
    return finetune.predict(fitted.tuned.views, photos, split)


def _metrics(features: Features, fitted: Fitted, split: Split) -> dict:
    probs, labels, _ = _predictions(features, fitted, split)
    return metrics.metrics(labels, probs, features.classes)


def score(features: Features, fitted: Fitted) -> Scores:
    """Train, val and test metrics. Val is the early-stopped model's, before a refit trained on the val images."""
    val = metrics.metrics(features.val.labels, fitted.val_probs, features.classes) if features.has_val else None
    if fitted.tuned is not None and features.has_val and not fitted.refit_epochs:
        val = _metrics(features, fitted, features.val)
    probs, labels, paths = _predictions(features, fitted, features.test)
    test = metrics.metrics(labels, probs, features.classes)
    photos = {
        "misclassified": metrics.misclassified(paths, labels, probs, features.classes),
        "least_confident": metrics.least_confident(paths, labels, probs, features.classes),
    }
    return Scores(_metrics(features, fitted, features.train)["accuracy"], val, test, photos)


@dataclass(frozen=True)
class Verdict:
    """Whether the run beats the promoted one on val accuracy, and whether it becomes ``latest`` now."""

    previous_val_accuracy: float | None
    better: bool
    promoted: bool


def _current_val_accuracy(runs_root: Path) -> float | None:
    link = runs_root / "latest"
    if not link.exists():
        return None
    try:
        return float(files.read_json(link / "meta.json")["val_accuracy"])
    except (UsageError, KeyError, TypeError, ValueError):
        return None


def judge(runs_root: Path, scores: Scores, *, promote_if_better: bool, defer_promotion: bool, log: RunLog) -> Verdict:
    """Compare with ``latest``: promote unless ``promote_if_better`` and not better, or promotion is deferred."""
    previous = _current_val_accuracy(runs_root)
    better = previous is None or scores.val_accuracy > previous
    promoted = (better or not promote_if_better) and not defer_promotion
    test = scores.test_accuracy
    log(
        f"train {scores.train:.4f}, val {scores.val_accuracy:.4f}, test "
        + (f"{test:.4f}" if test is not None else "-")
        + f"; latest had val {previous if previous is not None else '-'}; "
        + ("promoted" if promoted else "awaiting evaluation" if defer_promotion else "not promoted")
    )
    return Verdict(previous, better, promoted)


def _source_record(features: Features) -> dict:
    """What made the features: backbone, input, weights, data and split, as the run's meta.json records it."""
    meta = features.meta
    return {
        "kind": "tlcli-run",
        "classes": features.classes,
        "backbone": meta["backbone"],
        "alpha": meta.get("alpha"),
        "input_size": meta["input_size"],
        "resize": meta["resize"],
        "flip_average": meta.get("flip_average", False),
        "weights": meta["weights"],
        "weights_sha256": meta.get("weights_sha256"),
        "features_dir": str(features.path.resolve()),
        "features_key": meta["key"],
        "data_dir": meta["data_dir"],
        "split_hash": meta["split_hash"],
        "counts": {s: meta["splits"][s]["n"] for s in meta["splits"]},
    }


def _fine_tune_record(fitted: Fitted) -> dict | None:
    tuned = fitted.tuned
    if tuned is None:
        return None
    return {
        **dataclasses.asdict(fitted.fine_tune),
        "augment": list(fitted.fine_tune.augment),
        "unfrozen": tuned.unfrozen,
        "epochs_run": len(tuned.history["loss"]),
        "on": "train+val, every epoch" if fitted.refit_epochs else "train, early stopping on val",
        "schedule": "cosine decay to 0",
        "start_val_loss": tuned.start_val_loss,
        "best_epoch": tuned.best_epoch,
        "replicas": fitted.replicas,
        "batchnorm": "frozen (inference mode)",
    }


def describe(features: Features, fitted: Fitted, scores: Scores, verdict: Verdict, config: dict | None) -> dict:
    """The run's meta.json: what made its features, both recipes and what they ran, its scores and verdict."""
    recorded = {k: v for k, v in dataclasses.asdict(fitted.recipe).items() if k not in ("refit", "seed")}
    test = features.test
    return {
        **_source_record(features),
        "head": {
            **recorded,
            "epochs_run": len(fitted.history.get("loss", [])),
            "refit_on_train_and_val_epochs": fitted.refit_epochs,
        },
        "fine_tune": _fine_tune_record(fitted),
        "seed": fitted.recipe.seed,
        "config": config,
        "train_accuracy": scores.train,
        "val_accuracy": scores.val_accuracy,
        "test_accuracy": scores.test_accuracy,
        "previous_val_accuracy": verdict.previous_val_accuracy,
        "versions": runs.versions(),
        "test_files": [[p, int(lab)] for p, lab in zip(test.paths, test.labels, strict=True)],
        "promoted": verdict.promoted,
    }


def write_run(runs_root: Path, fitted: Fitted, scores: Scores, run_meta: dict, log: RunLog, name: str) -> Path:
    """Stage the model, history, metrics, plots, meta.json, train.log and report.html, then publish them as one new
    run folder ``name``."""
    files.remove_leftovers(runs_root)
    classes = run_meta["classes"]
    with runs.staging_dir(runs_root) as staging:
        with files.atomic_path(staging / "model.keras", suffix=".keras") as tmp:
            fitted.model.save(tmp)
        files.write_json(staging / "history.json", fitted.histories())
        files.write_json(staging / "metrics.json", {"split": "test", **scores.test, "val": scores.val})
        if scores.test["n"]:
            plots.confusion_png(scores.test["confusion"], classes, staging / "confusion.png", "test split")
        title = f"{run_meta['backbone']} head" + (", then fine-tuned" if fitted.tuned else "")
        plots.curves_png(fitted.histories(flat=True), staging / "curves.png", f"{title}, {len(classes)} classes")
        files.write_json(staging / "meta.json", run_meta)
        files.write_bytes(staging / "train.log", log.text().encode())
        for kind, records in scores.test_photos.items():
            files.write_json(staging / f"{kind}.json", records)
        report.write_report(staging, name)
        return runs.publish(staging, runs_root, name=name)


@dataclass(frozen=True)
class Trained:
    """What ``train`` did, in every process: the run it saved (None on a multi-worker cluster's other workers,
    whose chief saves it), its scores, the verdict and the time taken. ``summary`` is train-head's JSON."""

    run: str | None
    promoted: bool = False
    better: bool = False
    pruned: list[str] = field(default_factory=list)
    latest: str | None = None
    classes: list[str] = field(default_factory=list)
    train_accuracy: float | None = None
    val_accuracy: float | None = None
    previous_val_accuracy: float | None = None
    test_accuracy: float | None = None
    epochs_run: int = 0
    refit_epochs: int | None = None
    fine_tune_epochs_run: int | None = None
    fine_tune_best_epoch: int | None = None
    fine_tune_resumed_from: int | None = None
    fit_seconds: float = 0.0
    seconds: float = 0.0
    worker: int | None = None

    def summary(self) -> dict:
        """The JSON document: a worker says what it trained and that its chief saves the run."""
        if self.run is None:
            return {
                "run": None,
                "worker": self.worker,
                "note": WORKER_NOTE,
                "epochs_run": self.epochs_run,
                "fine_tune_epochs_run": self.fine_tune_epochs_run,
                "seconds": self.seconds,
            }
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "worker"}


def _outcome(fitted: Fitted, started: float, **saved) -> Trained:
    """The result of a run saved with ``saved`` (run, promoted, ...), or of a worker that saves nothing."""
    tuned = fitted.tuned
    return Trained(
        epochs_run=len(fitted.history["loss"]),
        refit_epochs=fitted.refit_epochs,
        fine_tune_epochs_run=len(tuned.history["loss"]) if tuned else None,
        fine_tune_best_epoch=tuned.best_epoch if tuned else None,
        fine_tune_resumed_from=tuned.resumed_from if tuned else None,
        fit_seconds=round(fitted.seconds, 3),
        seconds=round(time.perf_counter() - started, 3),
        **saved,
    )


def _checkpoint(
    out: Path, features: Features, recipe: HeadRecipe, fine_tune: FineTuneRecipe | None, strategy, resume: bool
) -> runs.Checkpoint | None:
    """Where fine-tuning saves every finished epoch, keyed by all that shapes it, for an identical command to
    resume (``resume`` False starts over). Not under a multi-worker cluster, whose workers would disagree."""
    import tensorflow as tf

    if fine_tune is None or isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    shaped_by = {
        "store": features.meta["key"],
        "splits": {name: split.get("file") for name, split in features.meta["splits"].items()},
        "head": dataclasses.asdict(recipe),
        "fine_tune": dataclasses.asdict(fine_tune),
    }
    key = hashlib.blake2b(json.dumps(shaped_by, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    checkpoint = runs.Checkpoint(out, key)
    if not resume:
        checkpoint.clear()
    return checkpoint


@contextlib.contextmanager
def _writing(out: Path, strategy, wait: bool) -> Iterator[None]:
    """Hold the runs folder's lock for the whole of training, so a second writer stops at once.

    Only the process that writes the run locks: the other workers of a multi-worker cluster do not.
    """
    if distribute.is_writer(strategy):
        with locks.lock(out / LOCK_NAME, f"train-head is writing {out}", wait=wait):
            yield
    else:
        yield


def train(
    features_dir: str | os.PathLike,
    out: str | os.PathLike,
    recipe: HeadRecipe = HEAD,
    *,
    fine_tune: FineTuneRecipe | None = None,
    promote_if_better: bool = False,
    defer_promotion: bool = False,
    keep: int | None = None,
    config: dict | None = None,
    backbone: str | None = None,
    size: int | None = None,
    progress: Progress | None = None,
    tensorboard: str | os.PathLike | None = None,
    wait: bool = False,
    strategy=None,
    resume: bool = True,
) -> Trained:
    """Train a head on the store at ``features_dir`` and save a full run under ``out``.

    ``backbone`` and ``size`` refuse features made otherwise; ``keep`` prunes old never-promoted runs;
    ``defer_promotion`` publishes the run without moving ``latest`` (``tlcli run`` promotes after
    evaluating); ``config`` is recorded in meta.json so the run can be redone. With ``fine_tune`` the
    trained head then goes on top of the backbone, whose top layers are trained end to end with it on
    the store's training images, under ``strategy`` (a tf.distribute strategy; by default the
    recipe's). A multi-worker cluster's other workers train and return without writing anything.
    Per-epoch scalars go to ``tensorboard/<the run folder's name>``. Fine-tuning saves every finished epoch
    under ``out`` and an identical command resumes it, unless not ``resume``; the checkpoint is removed once
    the run is published.
    """
    started, log, out, name = time.perf_counter(), RunLog(), Path(out), runs.timestamp()
    if strategy is None and fine_tune is not None and fine_tune.strategy:
        strategy = distribute.distribution(fine_tune.strategy)
    with _writing(out, strategy, wait):
        features = load_features(features_dir, backbone=backbone, size=size, log=log)
        checkpoint = _checkpoint(out, features, recipe, fine_tune, strategy, resume)
        fitted = fit(
            features,
            recipe,
            fine_tune,
            strategy=strategy,
            progress=progress,
            tensorboard=Path(tensorboard) / name if tensorboard else None,
            log=log,
            checkpoint=checkpoint,
        )
        if not distribute.is_writer(strategy):
            return _outcome(fitted, started, run=None, worker=int(strategy.cluster_resolver.task_id))
        scores = score(features, fitted)
        verdict = judge(out, scores, promote_if_better=promote_if_better, defer_promotion=defer_promotion, log=log)
        run_dir = write_run(out, fitted, scores, describe(features, fitted, scores, verdict, config), log, name)
        if checkpoint is not None:
            checkpoint.clear()
        if verdict.promoted:
            runs.promote(out, run_dir)
        pruned = runs.prune(out, keep) if keep is not None and not defer_promotion else []
        where = {"run": str(run_dir), "pruned": pruned, "latest": str(out / "latest"), "classes": features.classes}
        return _outcome(fitted, started, **where, **scores.accuracies(), **dataclasses.asdict(verdict))
