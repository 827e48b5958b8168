"""Train a softmax head on stored features, then save backbone + head as one pixels-in model."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tlcli.errors import UsageError
from tlcli.models import backbones
from tlcli.models.run import pixels_model
from tlcli.store import files, locks, runs
from tlcli.store.features import Split, Store
from tlcli.store.locks import LOCK_NAME
from tlcli.train import finetune, metrics, plots


class RunLog:
    """Timestamped lines of what a training run did and decided, saved as train.log in the run folder."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(f"{datetime.now(timezone.utc).isoformat(timespec='milliseconds')}  {message}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass(frozen=True)
class Recipe:
    """train-head's head defaults, shared by train-head, cross-validate and ``train``."""

    epochs: int = 600
    batch_size: int = 64
    learning_rate: float = 1e-3
    dropout: float = 0.5
    l2: float = 1e-3
    patience: int = 30
    refit: bool = True
    balance: bool = True


HEAD = Recipe()


def seeded(seed: int) -> None:
    """Fix Python, NumPy and TensorFlow seeds and make TensorFlow ops deterministic, so a seed redoes a run."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _epoch_observer(
    progress: Callable[[int, int, dict], None] | None, tensorboard: str | os.PathLike | None, log: RunLog
) -> Callable[[int, int, dict], None]:
    """Per-epoch hook: progress bar, TensorBoard scalars, and a log line every 10 epochs."""
    import tensorflow as tf

    writer = None
    if tensorboard:
        try:
            import tensorboard as _  # noqa: F401  (tf.summary's scalar writer lives in this package)
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install 'tlcli[tensorboard]'") from None
        writer = tf.summary.create_file_writer(str(Path(tensorboard) / runs.timestamp()))

    def on_epoch(done: int, total: int, last: dict) -> None:
        if writer is not None:
            with writer.as_default():
                for name, value in last.items():
                    tf.summary.scalar(name, value, step=done)
            writer.flush()
        if done % 10 == 0 or done == 1:
            log(f"epoch {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
        if progress:
            progress(done, total, last)

    return on_epoch


def _class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return {i: float(w) for i, w in enumerate(weights)}


def build_head(dim: int, n_classes: int, dropout: float, l2: float):
    """Dropout + dense softmax on pooled features."""
    import keras

    inputs = keras.Input((dim,), name="features")
    x = keras.layers.Dropout(dropout, name="head_dropout")(inputs)
    outputs = keras.layers.Dense(
        n_classes,
        activation="softmax",
        kernel_regularizer=keras.regularizers.l2(l2) if l2 else None,
        name="predictions",
    )(x)
    return keras.Model(inputs, outputs, name="head")


def fit_head(
    head,
    train,
    val,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    class_weights: dict[int, float] | None,
    seed: int,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict[str, list[float]]:
    """Mini-batch Adam on in-memory features, one compiled step per epoch; early stopping restores the best weights.

    Keras' ``fit`` spends ~70 ms of bookkeeping per epoch, which on a few thousand stored vectors is
    nearly all of the time; running each epoch as one graph keeps head training in seconds.
    """
    import keras
    import tensorflow as tf

    x = tf.constant(train.features)
    y = tf.constant(train.labels)
    w = tf.constant(
        np.asarray(
            [class_weights[int(c)] for c in train.labels] if class_weights else np.ones(len(train.labels)), np.float32
        )
    )
    n = len(train.labels)
    batch_size = min(batch_size, n)
    steps = n // batch_size
    optimizer = keras.optimizers.Adam(learning_rate)
    ce = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    variables = head.trainable_variables
    rng = tf.random.Generator.from_seed(seed)

    @tf.function
    def epoch() -> tuple:
        order = tf.argsort(rng.uniform((n,)))
        total = tf.constant(0.0)
        correct = tf.constant(0.0)
        for i in tf.range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb, yb, wb = tf.gather(x, idx), tf.gather(y, idx), tf.gather(w, idx)
            with tf.GradientTape() as tape:
                probs = head(xb, training=True)
                loss = tf.reduce_sum(ce(yb, probs) * wb) / tf.reduce_sum(wb) + tf.add_n(
                    head.losses or [tf.constant(0.0)]
                )
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            total += loss
            correct += tf.reduce_sum(tf.cast(tf.argmax(probs, 1, output_type=y.dtype) == yb, tf.float32))
        return total / tf.cast(steps, tf.float32), correct / tf.cast(steps * batch_size, tf.float32)

    @tf.function
    def score(xs, ys) -> tuple:
        probs = head(xs, training=False)
        loss = tf.reduce_mean(ce(ys, probs))
        return loss, tf.reduce_mean(tf.cast(tf.argmax(probs, 1, output_type=ys.dtype) == ys, tf.float32))

    xv = tf.constant(val.features) if val is not None else None
    yv = tf.constant(val.labels) if val is not None else None
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    if val is not None:
        history.update(val_loss=[], val_accuracy=[])
    best, best_weights, waited = np.inf, head.get_weights(), 0
    for e in range(epochs):
        loss, acc = epoch()
        history["loss"].append(round(float(loss), 6))
        history["accuracy"].append(round(float(acc), 6))
        monitored = float(loss)
        if val is not None:
            vloss, vacc = score(xv, yv)
            history["val_loss"].append(round(float(vloss), 6))
            history["val_accuracy"].append(round(float(vacc), 6))
            monitored = float(vloss)
        if progress:
            progress(e + 1, epochs, {k: v[-1] for k, v in history.items()})
        if monitored < best - 1e-6:
            best, best_weights, waited = monitored, head.get_weights(), 0
        else:
            waited += 1
            if waited >= patience:
                break
    head.set_weights(best_weights)
    return history


def fit_and_refit(
    train_split: Split,
    val_split: Split,
    n_classes: int,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    dropout: float,
    l2: float,
    patience: int,
    balance: bool,
    refit: bool,
    seed: int,
    on_epoch: Callable[[int, int, dict], None] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[object, dict[str, list[float]], np.ndarray | None]:
    """Train-head's recipe on feature splits: early stopping on val, then (with ``refit``) a fresh head
    trained on train+val for the best epoch count. Returns the head, its history and the early-stopped
    head's val probabilities (taken before the refit sees the val images; None without val images)."""
    seeded(seed)
    head = build_head(train_split.features.shape[1], n_classes, dropout, l2)
    has_val = len(val_split.labels) > 0
    hist = fit_head(
        head,
        train_split,
        val_split if has_val else None,
        epochs,
        batch_size,
        learning_rate,
        patience,
        _class_weights(train_split.labels, n_classes) if balance else None,
        seed,
        on_epoch,
    )
    log(
        f"stopped after {len(hist['loss'])} epochs"
        + (f", best val loss {min(hist['val_loss']):.4f}" if has_val else "")
    )
    val_probs = np.asarray(head(val_split.features, training=False)) if has_val else None
    if refit and has_val:
        refit_epochs = int(np.argmin(hist["val_loss"])) + 1
        both = Split.joined([train_split, val_split])
        log(f"refit on train+val ({len(both.labels)} images) for {refit_epochs} epochs")
        seeded(seed)
        head = build_head(train_split.features.shape[1], n_classes, dropout, l2)
        refit_hist = fit_head(
            head,
            both,
            None,
            refit_epochs,
            batch_size,
            learning_rate,
            refit_epochs + 1,
            _class_weights(both.labels, n_classes) if balance else None,
            seed,
        )
        hist["refit_loss"] = refit_hist["loss"]
    return head, hist, val_probs


def _check_expectations(meta: dict, backbone: str | None, size: int | None, alpha: float | None) -> None:
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
    if alpha is not None and meta.get("alpha") is not None and alpha != meta["alpha"]:
        raise UsageError(
            f"these features were made with alpha {meta['alpha']:g}, not {alpha:g}; re-run 'tlcli extract'"
        )


def _current_val_accuracy(runs_root: Path) -> float | None:
    link = runs_root / "latest"
    if not link.exists():
        return None
    try:
        return float(files.read_json(link / "meta.json")["val_accuracy"])
    except (UsageError, KeyError, TypeError, ValueError):
        return None


def _holding_runs_lock(fn: Callable) -> Callable:
    """Hold the runs folder's lock for the whole of training, so a second writer stops at once.

    Only the process that writes the run locks: the other workers of a multi-worker cluster do not.
    """

    @functools.wraps(fn)
    def wrapper(features_dir, out, *args, wait: bool = False, strategy=None, fine_tune=None, **kwargs):
        if strategy is None and fine_tune is not None and fine_tune.strategy:
            strategy = finetune.distribution(fine_tune.strategy)
        held = (
            locks.lock(Path(out) / LOCK_NAME, f"train-head is writing {out}", wait=wait)
            if finetune.is_writer(strategy)
            else contextlib.nullcontext()
        )
        with held:
            return fn(features_dir, out, *args, wait=wait, strategy=strategy, fine_tune=fine_tune, **kwargs)

    return wrapper


@_holding_runs_lock
def train(
    features_dir: str | os.PathLike,
    out: str | os.PathLike,
    epochs: int = HEAD.epochs,
    batch_size: int = HEAD.batch_size,
    learning_rate: float = HEAD.learning_rate,
    dropout: float = HEAD.dropout,
    l2: float = HEAD.l2,
    patience: int = HEAD.patience,
    balance: bool = HEAD.balance,
    refit: bool = HEAD.refit,
    seed: int = 0,
    promote_if_better: bool = False,
    backbone: str | None = None,
    size: int | None = None,
    alpha: float | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    wait: bool = False,
    keep: int | None = None,
    tensorboard: str | os.PathLike | None = None,
    defer_promotion: bool = False,
    config: dict | None = None,
    fine_tune: finetune.Options | None = None,
    strategy=None,
) -> dict:
    """Train a head on the store at ``features_dir`` and save a full run under ``out``; return a summary.

    ``keep`` prunes old never-promoted runs; ``tensorboard`` writes per-epoch scalars there;
    ``defer_promotion`` publishes the run without moving ``latest`` (``tlcli run`` promotes after
    evaluating); ``config`` is recorded in meta.json so the run can be redone. With ``fine_tune``
    the trained head then goes on top of the backbone, whose top layers are trained end to end with
    it on the store's training images, under ``strategy`` (a tf.distribute strategy). A multi-worker
    cluster's other workers train and return without writing anything.
    """
    import keras

    started = time.perf_counter()
    log = RunLog()
    if fine_tune is not None:
        finetune.check(fine_tune)
    store = Store.open(features_dir)
    meta = store.meta
    _check_expectations(meta, backbone, size, alpha)
    train_split, val_split, test_split = (store.split(s) for s in ("train", "val", "test"))
    classes = meta["classes"]
    n_classes = len(classes)
    if len(train_split.labels) == 0:
        raise UsageError(f"{features_dir} has no training images; add images and re-run 'tlcli extract'")
    present = np.unique(train_split.labels)
    if len(present) < 2:
        raise UsageError("the training split holds a single class; a classifier needs at least two")

    log(
        f"features {Path(features_dir).resolve()} ({meta['key']}): train {len(train_split.labels)}, "
        f"val {len(val_split.labels)}, test {len(test_split.labels)} images, {n_classes} classes"
    )
    log(f"head: dropout {dropout}, l2 {l2}, lr {learning_rate}, batch {batch_size}, epochs <= {epochs}, seed {seed}")
    has_val = len(val_split.labels) > 0
    fit_t = time.perf_counter()
    head, hist, val_probs = fit_and_refit(
        train_split,
        val_split,
        n_classes,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        dropout=dropout,
        l2=l2,
        patience=patience,
        balance=balance,
        refit=refit,
        seed=seed,
        on_epoch=_epoch_observer(progress, tensorboard, log),
        log=log,
    )
    # val accuracy of the early-stopped head, before a refit saw the val images
    val_metrics = metrics.metrics(val_split.labels, val_probs, classes) if has_val else None
    refit_epochs = len(hist["refit_loss"]) if "refit_loss" in hist else None
    tuned, fine_tune_lr = None, None
    if fine_tune is None:
        full, _ = pixels_model(meta, head)

        def probabilities(split) -> tuple[np.ndarray, np.ndarray]:
            return head.predict(split.features, verbose=0, batch_size=256), split.labels

    else:
        fine_tune_lr = fine_tune.learning_rate or learning_rate / 10

        def build() -> tuple:
            copy = keras.models.clone_model(head)
            copy.set_weights(head.get_weights())
            return pixels_model(meta, copy)

        # like the head's refit: with it, fine-tune on train+val for every epoch; without, stop early on val
        tune_on, stop_on = (
            (Split.joined([train_split, val_split]), None)
            if refit_epochs
            else (train_split, val_split if has_val else None)
        )
        keras.utils.set_random_seed(seed)
        tuned = finetune.fine_tune(
            build,
            meta["data_dir"],
            tune_on,
            stop_on,
            meta["input_size"],
            meta["resize"],
            fine_tune,
            fine_tune_lr,
            _class_weights(tune_on.labels, n_classes) if balance else None,
            seed,
            strategy=strategy,
            progress=progress,
        )
        full = tuned.model
        ran = len(tuned.history["loss"])
        log(
            f"fine-tuned {len(tuned.unfrozen)} layers on {len(tune_on.labels)} images for {ran} epochs "
            f"at lr {fine_tune_lr:g} (cosine decay); "
            + (
                f"kept epoch {tuned.best_epoch}"
                if tuned.best_epoch
                else "no epoch beat the head-only start, whose weights are kept"
            )
        )
        if not finetune.is_writer(strategy):
            return {
                "run": None,
                "worker": int(strategy.cluster_resolver.task_id),
                "note": "trained as a worker of the cluster; its chief saves the run",
                "epochs_run": len(hist["loss"]),
                "fine_tune_epochs_run": len(tuned.history["loss"]),
                "seconds": round(time.perf_counter() - started, 3),
            }

        def probabilities(split) -> tuple[np.ndarray, np.ndarray]:
            return finetune.predict(full, meta["data_dir"], split, meta["input_size"], meta["resize"])

    fit_seconds = time.perf_counter() - fit_t

    def scores(split) -> dict:
        probs, labels = probabilities(split) if len(split.labels) else (np.zeros((0, n_classes)), split.labels)
        return metrics.metrics(labels, probs, classes)

    if tuned is not None and has_val and not refit_epochs:  # after a refit, val was trained on
        val_metrics = scores(val_split)
    test_metrics = scores(test_split)
    train_acc = scores(train_split)["accuracy"]

    runs_root = Path(out)
    files.remove_leftovers(runs_root)
    previous = _current_val_accuracy(runs_root)
    val_acc = val_metrics["accuracy"] if val_metrics else train_acc
    better = previous is None or val_acc > previous
    promoted = (better or not promote_if_better) and not defer_promotion
    log(
        f"train {train_acc:.4f}, val {val_acc:.4f}, test "
        + (f"{test_metrics['accuracy']:.4f}" if test_metrics["n"] else "-")
        + f"; latest had val {previous if previous is not None else '-'}; "
        + ("promoted" if promoted else "awaiting evaluation" if defer_promotion else "not promoted")
    )
    test_files = [[p, int(lab)] for p, lab in zip(test_split.paths, test_split.labels, strict=True)]
    run_meta = {
        "kind": "tlcli-run",
        "classes": classes,
        "backbone": meta["backbone"],
        "alpha": meta.get("alpha"),
        "input_size": meta["input_size"],
        "resize": meta["resize"],
        "flip_average": meta.get("flip_average", False),
        "weights": meta["weights"],
        "weights_sha256": meta.get("weights_sha256"),
        "features_dir": str(Path(features_dir).resolve()),
        "features_key": meta["key"],
        "data_dir": meta["data_dir"],
        "split_hash": meta["split_hash"],
        "counts": {s: meta["splits"][s]["n"] for s in meta["splits"]},
        "head": {
            "dropout": dropout,
            "l2": l2,
            "learning_rate": learning_rate,
            "batch_size": batch_size,
            "epochs": epochs,
            "epochs_run": len(hist.get("loss", [])),
            "patience": patience,
            "class_weights": balance,
            "refit_on_train_and_val_epochs": refit_epochs,
        },
        "fine_tune": None
        if tuned is None
        else {
            "layers": fine_tune.layers,
            "from_layer": fine_tune.from_layer,
            "unfrozen": tuned.unfrozen,
            "learning_rate": fine_tune_lr,
            "batch_size": fine_tune.batch_size,
            "epochs": fine_tune.epochs,
            "epochs_run": len(tuned.history["loss"]),
            "patience": fine_tune.patience,
            "on": "train+val, every epoch" if refit_epochs else "train, early stopping on val",
            "schedule": "cosine decay to 0",
            "start_val_loss": tuned.start_val_loss,
            "best_epoch": tuned.best_epoch,
            "augment": list(fine_tune.augment),
            "strategy": fine_tune.strategy,
            "replicas": strategy.num_replicas_in_sync if strategy else 1,
            "batchnorm": "frozen (inference mode)",
        },
        "seed": seed,
        "config": config,
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "test_accuracy": test_metrics["accuracy"] if test_metrics["n"] else None,
        "previous_val_accuracy": previous,
        "versions": runs.versions(),
        "test_files": test_files,
    }
    with runs.staging_dir(runs_root) as staging:
        with files.atomic_path(staging / "model.keras", suffix=".keras") as tmp:
            full.save(tmp)
        files.write_json(staging / "history.json", hist if tuned is None else {**hist, "fine_tune": tuned.history})
        files.write_json(staging / "metrics.json", {"split": "test", **test_metrics, "val": val_metrics})
        if test_metrics["n"]:
            plots.confusion_png(test_metrics["confusion"], classes, staging / "confusion.png", "test split")
        plots.curves_png(
            hist if tuned is None else {**hist, **{f"fine_tune_{k}": v for k, v in tuned.history.items()}},
            staging / "curves.png",
            f"{meta['backbone']} head" + (", then fine-tuned" if tuned else "") + f", {n_classes} classes",
        )
        run_meta["promoted"] = promoted
        files.write_json(staging / "meta.json", run_meta)
        files.write_bytes(staging / "train.log", log.text().encode())
        run_dir = runs.publish(staging, runs_root)
    if promoted:
        runs.promote(runs_root, run_dir)
    pruned = runs.prune(runs_root, keep) if keep is not None and not defer_promotion else []
    return {
        "run": str(run_dir),
        "promoted": promoted,
        "better": better,
        "pruned": pruned,
        "latest": str(runs_root / "latest"),
        "classes": classes,
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "previous_val_accuracy": previous,
        "test_accuracy": run_meta["test_accuracy"],
        "epochs_run": run_meta["head"]["epochs_run"],
        "refit_epochs": refit_epochs,
        "fine_tune_epochs_run": run_meta["fine_tune"]["epochs_run"] if tuned else None,
        "fine_tune_best_epoch": tuned.best_epoch if tuned else None,
        "fit_seconds": round(fit_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }


def conclude(
    runs_root: str | os.PathLike,
    run_dir: str | os.PathLike,
    promote: bool,
    evaluation: dict | None = None,
    keep: int | None = None,
    wait: bool = False,
) -> list[str]:
    """Record a deferred run's verdict (and its evaluation) in meta.json, move ``latest`` if promoted, prune.

    Returns the names of pruned runs.
    """
    runs_root, run_dir = Path(runs_root), Path(run_dir)
    with locks.lock(runs_root / LOCK_NAME, f"train-head is writing {runs_root}", wait=wait):
        meta = files.read_json(run_dir / "meta.json")
        meta["promoted"] = promote
        meta["evaluation"] = evaluation
        files.write_json(run_dir / "meta.json", meta)
        if promote:
            runs.promote(runs_root, run_dir)
        return runs.prune(runs_root, keep) if keep is not None else []
