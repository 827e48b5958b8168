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
from typing import NamedTuple

import numpy as np

from tlcli.errors import UsageError
from tlcli.models import backbones, portable
from tlcli.models.graph import apply_model
from tlcli.models.run import pixels_model
from tlcli.store import files, locks, runs
from tlcli.store.features import Split, Store
from tlcli.store.locks import LOCK_NAME
from tlcli.train import calibrate, distribute, finetune, metrics, plots, promotion, report, unknown
from tlcli.train.head import Progress, class_weights, fit_and_refit, probabilities
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
    features = Features(Path(features_dir), store.meta, *store.splits())
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


class Predicted(NamedTuple):
    """A model's probabilities on the readable photos of a split, with their labels and paths."""

    probs: np.ndarray
    labels: np.ndarray
    paths: list[str]


@dataclass(frozen=True)
class Scores:
    """Metrics of the fitted model on each split; ``val`` None without val images. ``test_photos``: the test
    photos to look at (``misclassified`` and ``least_confident`` records, each written as a JSON file).
    ``held_out`` holds the val predictions behind ``val``: the model's before any refit saw val (for calibration
    and promotion)."""

    train: float
    val: dict | None
    test: dict
    test_photos: dict[str, list[dict]] = field(default_factory=dict)
    held_out: Predicted | None = field(default=None, repr=False)

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
        return probabilities(fitted.head, split.features), split.labels, photos.paths(split)
    return finetune.predict(fitted.tuned.views, photos, split)


def _metrics(features: Features, fitted: Fitted, split: Split) -> dict:
    probs, labels, _ = _predictions(features, fitted, split)
    return metrics.metrics(labels, probs, features.classes)


def _on_photos(model, features: Features, split: Split) -> tuple[np.ndarray, list[int]]:
    """Outputs of a model taking views on a stored split's photos, and the indices of those it could read."""
    photos = finetune.Photos.of(features.meta)
    outputs, kept, _ = apply_model(model, photos.paths(split), photos.size, photos.resize)
    return outputs, kept


def _held_out(features: Features, fitted: Fitted) -> Predicted | None:
    """Val predictions of the model before any refit saw val: the early-stopped head's, or a fine-tuned model's
    when it stopped early on val (None without val images)."""
    if not features.has_val:
        return None
    val = features.val
    if fitted.tuned is not None and not fitted.refit_epochs:
        probs, kept = _on_photos(fitted.tuned.views, features, val)
        return Predicted(probs, val.labels[kept], [val.paths[i] for i in kept])
    return Predicted(fitted.val_probs, val.labels, val.paths)


def score(features: Features, fitted: Fitted) -> Scores:
    """Train, val and test metrics. Val is the early-stopped model's, before a refit trained on the val images."""
    held_out = _held_out(features, fitted)
    val = metrics.metrics(held_out.labels, held_out.probs, features.classes) if held_out else None
    probs, labels, paths = _predictions(features, fitted, features.test)
    test = metrics.metrics(labels, probs, features.classes)
    photos = {
        "misclassified": metrics.misclassified(paths, labels, probs, features.classes),
        "least_confident": metrics.least_confident(paths, labels, probs, features.classes),
    }
    return Scores(_metrics(features, fitted, features.train)["accuracy"], val, test, photos, held_out)


def calibrated(fitted: Fitted, scores: Scores, log: RunLog) -> dict | None:
    """Fit a temperature on the held-out val predictions and fold it into the model's head (None without val)."""
    found = scores.held_out
    temperature = None if found is None else calibrate.fitted_or_none(found.probs, found.labels)
    if temperature is None:
        log(
            f"val has fewer than {calibrate.MIN_IMAGES} images or no mistakes (a temperature would be noise or "
            "only sharpen): probabilities left uncalibrated"
        )
        return None
    before = calibrate.reliability(found.probs, found.labels)["ece"]
    after = calibrate.reliability(calibrate.rescaled(found.probs, temperature), found.labels)["ece"]
    portable.fold_temperature(fitted.model, temperature)
    log(f"temperature {temperature:g} fitted on {len(found.labels)} val images: val ECE {before:.4f} -> {after:.4f}")
    return {
        "temperature": temperature,
        "fitted_on": f"val ({len(found.labels)} images), before any refit",
        "val_ece_before": before,
        "val_ece_after": after,
    }


def unknown_detector(features: Features, fitted: Fitted, log: RunLog) -> tuple[unknown.Detector, dict]:
    """The unknown-input detector: a bank of training features and a threshold from val. A fine-tuned model's
    features differ from the store's, so its own are computed on the bank's photos and on val."""
    bank_split = features.train.take(unknown.bank_indices(features.train.labels, fitted.recipe.seed))
    if fitted.tuned is None:
        bank, val, source = bank_split.features, features.val.features, "the feature store (frozen backbone)"
    else:
        model, n_classes = portable.with_features(fitted.tuned.views), len(features.classes)
        bank, val = (_on_photos(model, features, s)[0][:, n_classes:] for s in (bank_split, features.val))
        source = "the fine-tuned model, on the bank's photos and val"
    detector, record = unknown.fit(bank, val)
    log(
        f"unknown score: distance to neighbour k={record['k']} among {record['bank']} training features, threshold "
        f"{record['threshold']:.4f} ({record['percentile']:g}th percentile on {record['threshold_on']})"
    )
    return detector, {**record, "features": source}


@dataclass(frozen=True)
class Verdict:
    """Whether the run beats the promoted one on the same photos (``comparison``, None without a latest or
    without ``promote_if_better``), and whether it becomes ``latest`` now."""

    previous_val_accuracy: float | None
    better: bool
    promoted: bool
    comparison: dict | None = None


def _current_val_accuracy(runs_root: Path) -> float | None:
    link = runs_root / "latest"
    if not link.exists():
        return None
    try:
        return float(files.read_json(link / "meta.json")["val_accuracy"])
    except (UsageError, KeyError, TypeError, ValueError):
        return None


def _comparison_line(c: dict | None) -> str:
    if c is None:
        return "no latest to compare with"
    return (
        f"on {c['photos']} {c['on']}: new {c['new_accuracy']:.4f}, latest {c['latest_accuracy']:.4f} "
        f"(McNemar p {c['mcnemar_p']:.3g})"
    )


def judge(
    features: Features,
    scores: Scores,
    *,
    rule: promotion.Rule | None,
    defer_promotion: bool,
    runs_root: Path,
    log: RunLog,
) -> Verdict:
    """Compare with ``latest``: given a promotion ``rule``, on the same photos (``promotion.compare``), and
    promote unless not better under the rule, or promotion is deferred."""
    previous = _current_val_accuracy(runs_root)
    comparison = None
    if rule is not None and scores.held_out is not None:
        comparison = promotion.compare(runs_root, scores.held_out, features.classes, features.meta["data_dir"], rule)
    if comparison is not None:
        better = comparison["better"]
    else:
        better = previous is None or not (runs_root / "latest").exists() or scores.val_accuracy > previous
    promoted = (better or rule is None) and not defer_promotion
    test = scores.test_accuracy
    log(
        f"train {scores.train:.4f}, val {scores.val_accuracy:.4f}, test "
        + (f"{test:.4f}" if test is not None else "-")
        + (f"; {_comparison_line(comparison)}" if rule is not None else "")
        + "; "
        + ("promoted" if promoted else "awaiting evaluation" if defer_promotion else "not promoted")
    )
    return Verdict(previous, better, promoted, comparison)


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


def trained_on(features: Features, fitted: Fitted) -> list[str]:
    """The photos the saved model trained on: train, and val after a refit."""
    return sorted(features.train.paths + (features.val.paths if fitted.refit_epochs else []))


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
        "promotion": verdict.comparison,
        "versions": runs.versions(),
        "test_files": [[p, int(lab)] for p, lab in zip(test.paths, test.labels, strict=True)],
        "promoted": verdict.promoted,
    }


def write_run(
    runs_root: Path,
    fitted: Fitted,
    scores: Scores,
    run_meta: dict,
    log: RunLog,
    name: str,
    *,
    detector: unknown.Detector | None = None,
    photos: list[str] = (),
) -> Path:
    """Stage the model, history, metrics, plots, the unknown score's bank, the photos trained on, meta.json,
    train.log and report.html, then publish them as one new run folder ``name``."""
    files.remove_leftovers(runs_root)
    classes = run_meta["classes"]
    with runs.staging_dir(runs_root) as staging:
        with files.atomic_path(staging / "model.keras", suffix=".keras") as tmp:
            fitted.model.save(tmp)
        if detector is not None:
            detector.save(staging)
        files.write_json(staging / promotion.TRAINED_ON, {"photos": list(photos)})
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
    comparison: dict | None = None
    test_accuracy: float | None = None
    temperature: float | None = None
    unknown_threshold: float | None = None
    epochs_run: int = 0
    refit_epochs: int | None = None
    fine_tune_epochs_run: int | None = None
    fine_tune_best_epoch: int | None = None
    fine_tune_resumed_from: int | None = None
    fit_seconds: float = 0.0
    seconds: float = 0.0
    worker: int | None = None

    def not_better(self) -> str:
        """Why the run is not better than latest, with the numbers of the comparison that decided it."""
        c = self.comparison
        if c is None:
            return f"val {self.val_accuracy:.4f} does not beat latest {self.previous_val_accuracy:.4f}"
        if not c["photos"]:
            return "every val photo was in latest's training set (has the data grown?): nothing to compare on"
        rule = f"gain > {c['min_gain']:g}" + (f", p <= {c['max_p']:g}" if c["max_p"] < 1 else "")
        return (
            f"on the same {c['photos']} {c['on']}, new {c['new_accuracy']:.4f} vs latest "
            f"{c['latest_accuracy']:.4f} (McNemar p {c['mcnemar_p']:.3g}) does not meet {rule}"
        )

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
    promote_rule: promotion.Rule = promotion.Rule(),
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

    With ``promote_if_better`` the run is compared with ``latest`` on the same photos and ``promote_rule`` decides.
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
        rule = promote_rule if promote_if_better else None
        verdict = judge(features, scores, rule=rule, defer_promotion=defer_promotion, runs_root=out, log=log)
        calibration = calibrated(fitted, scores, log)
        detector, detector_record = unknown_detector(features, fitted, log)
        run_meta = describe(features, fitted, scores, verdict, config)
        run_meta.update(calibration=calibration, unknown=detector_record)
        photos = trained_on(features, fitted)
        run_dir = write_run(out, fitted, scores, run_meta, log, name, detector=detector, photos=photos)
        if checkpoint is not None:
            checkpoint.clear()
        if verdict.promoted:
            runs.promote(out, run_dir)
        pruned = runs.prune(out, keep) if keep is not None and not defer_promotion else []
        where = {"run": str(run_dir), "pruned": pruned, "latest": str(out / "latest"), "classes": features.classes}
        trust = {
            "temperature": calibration["temperature"] if calibration else None,
            "unknown_threshold": detector_record["threshold"],
        }
        return _outcome(fitted, started, **where, **scores.accuracies(), **dataclasses.asdict(verdict), **trust)
