"""Fine-tuning: unfreeze the top of the backbone and train backbone + head end to end on augmented images.

BatchNormalization layers stay frozen: in Keras 3 a BN layer with ``trainable=False`` runs in inference
mode even when the model is called with ``training=True``, so its moving statistics (the ImageNet ones
the rest of the network was trained against) are neither updated nor replaced by small-batch statistics.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tlcli.data import images
from tlcli.errors import UsageError
from tlcli.models.graph import apply_model
from tlcli.store.features import Split
from tlcli.train.distribute import cluster_failures
from tlcli.train.recipes import FineTuneRecipe

CACHE_BYTES = 1 << 30
"""Decoded splits up to this size stay in memory after the first epoch; larger ones are decoded every epoch."""


def unfreeze(backbone, layers: int | None, from_layer: str | None) -> list[str]:
    """Make the top ``layers`` weight-holding layers (or every layer from ``from_layer`` up, or with neither
    every layer) trainable.

    Only layers with weights are counted (convolutions, dense, ...; BatchNormalization is never
    counted nor unfrozen), so N is the number of layers that learn: the Keras tutorials' count of all
    layers would make a small N unfreeze only activations and pooling. Returns the unfrozen layers
    that hold weights, bottom to top.
    """
    import keras

    stack = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]

    def learns(layer) -> bool:
        return bool(layer.weights) and not isinstance(layer, keras.layers.BatchNormalization)

    names = [layer.name for layer in stack]
    if from_layer is not None:
        if from_layer not in names:
            close = difflib.get_close_matches(from_layer, names, n=3, cutoff=0.5)
            hint = (
                f"; did you mean {', '.join(close)}?" if close else f"; its layers run from {names[0]} to {names[-1]}"
            )
            raise UsageError(f"--fine-tune-from {from_layer!r} is not a layer of {backbone.name}{hint}")
        start = names.index(from_layer)
    else:
        weighted = [i for i, layer in enumerate(stack) if learns(layer)]
        layers = len(weighted) if layers is None else layers
        if layers > len(weighted):
            raise UsageError(
                f"--fine-tune-layers {layers}: {backbone.name} has only {len(weighted)} layers with weights"
            )
        start = weighted[-layers]
    backbone.trainable = True
    for i, layer in enumerate(stack):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    unfrozen = [layer.name for layer in stack[start:] if learns(layer)]
    if not unfrozen:
        raise UsageError(f"--fine-tune-from {from_layer}: no layer with weights from there up; choose a lower layer")
    return unfrozen


def augmenter(names: tuple[str, ...], seed: int):
    """The random image transforms of ``--augment``, for the training input pipeline only."""
    from tlcli.train.augment import Augment

    return Augment(names, seed, name="augment")


@dataclass(frozen=True)
class Photos:
    """Where a feature store's photos are and how they become pixels: its data folder, input size and resize."""

    root: Path
    size: int
    resize: str

    @classmethod
    def of(cls, meta: dict) -> Photos:
        """The photos a feature store (or a run) was made from, as its meta.json records them."""
        return cls(Path(meta["data_dir"]), meta["input_size"], meta["resize"])

    def paths(self, split: Split) -> list[str]:
        return [str(self.root / p) for p in split.paths]


def _readable(photos: Photos, paths: Sequence[str], labels: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels, labels) of the files that decode, a batch at a time, by the loader extract and evaluate use."""
    done = 0
    for pixels, ok, _ in images.batches(paths, photos.size, photos.resize):
        yield pixels[ok], labels[done : done + len(pixels)][ok]
        done += len(pixels)


def image_dataset(
    photos: Photos,
    split: Split,
    batch_size: int,
    *,
    augment=None,
    seed: int = 0,
    training: bool = False,
):
    """A tf.data pipeline of (float32 pixels, label) batches for a stored split, decoded by ``images.batches``
    (a multi-view split's pixels as a tuple of views, the inputs of ``run.Built.views``).

    Training batches are reshuffled every epoch, full-sized (a remainder waits for the next epoch's
    shuffle) and augmented (by ``augment``, a layer from ``augmenter``) view by view, one batch after another
    so that a seed gives the same random transforms every time. Files gone since extraction are a usage error
    rather than a silently smaller split; a file that no longer decodes is left out rather than trained on as a
    blank.
    """
    import tensorflow as tf

    paths = photos.paths(split)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(
            f"{len(missing)} image(s) of the feature store are gone from {photos.root} (e.g. {missing[0]}); "
            "re-run 'tlcli extract'"
        )
    shape = images.pixel_shape(photos.size, photos.resize)
    labels = np.asarray(split.labels, np.int64)
    signature = (tf.TensorSpec((None, *shape), tf.uint8), tf.TensorSpec((None,), tf.int64))
    ds = tf.data.Dataset.from_generator(lambda: _readable(photos, paths, labels), output_signature=signature)
    ds = ds.unbatch()
    if len(paths) * int(np.prod(shape)) <= CACHE_BYTES:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=training)
    layer = augment if training else None

    def prepare(x, y):
        x = tf.cast(x, tf.float32)
        if layer is not None:
            x = tf.reshape(layer(tf.reshape(x, (-1, photos.size, photos.size, 3)), training=True), (-1, *shape))
        return (x if len(shape) == 3 else tuple(x[:, i] for i in range(shape[0]))), y

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.map(prepare).prefetch(tf.data.AUTOTUNE).with_options(options)


@dataclass
class Result:
    """A fine-tuned model (one image in, as saved; and the same weights taking views, as trained) and how it got
    there; ``best_epoch`` 0 means no epoch beat the starting model."""

    model: object
    views: object
    history: dict[str, list[float]]
    unfrozen: list[str]
    start_val_loss: float | None
    best_epoch: int
    resumed_from: int = 0


class _Steps(NamedTuple):
    """One distributed batch of training and of testing: each returns summed (loss, hits, images)."""

    train: Callable
    test: Callable


def _set_up(build: Callable, recipe: FineTuneRecipe, strategy, steps: int) -> tuple:
    """In ``strategy``'s scope: the models (``run.Built``), the unfrozen backbone layers and Adam on a cosine
    decay over ``steps``."""
    import keras

    with strategy.scope():
        built = build()
        unfrozen = unfreeze(built.backbone, recipe.layers, recipe.from_layer)
        optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(recipe.learning_rate, steps))
        optimizer.build(built.views.trainable_variables)
    return built, unfrozen, optimizer


def _batch_steps(full, optimizer, strategy, class_weights: dict[int, float] | None, batch_size: int) -> _Steps:
    """Compiled distributed steps: class-weighted cross-entropy (plus the model's penalties) for training."""
    import keras
    import tensorflow as tf

    n_classes = int(full.output_shape[-1])
    weights = tf.constant([(class_weights or {}).get(i, 1.0) for i in range(n_classes)], tf.float32)
    ce = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    variables = full.trainable_variables
    replicas = strategy.num_replicas_in_sync

    def sums(probs, labels, losses) -> tuple:
        hits = tf.cast(tf.argmax(probs, 1, output_type=labels.dtype) == labels, tf.float32)
        return tf.reduce_sum(losses), tf.reduce_sum(hits), tf.cast(tf.size(labels), tf.float32)

    def train_step(x, y) -> tuple:
        with tf.GradientTape() as tape:
            probs = full(x, training=True)
            losses = ce(y, probs) * tf.gather(weights, y)
            loss = tf.reduce_sum(losses) / batch_size + tf.add_n([*full.losses, tf.constant(0.0)]) / replicas
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return sums(probs, y, losses)

    def test_step(x, y) -> tuple:
        probs = full(x, training=False)
        return sums(probs, y, ce(y, probs))

    @tf.function(reduce_retracing=True)
    def train_batch(batch) -> list:
        return [strategy.reduce("SUM", v, axis=None) for v in strategy.run(train_step, args=batch)]

    @tf.function(reduce_retracing=True)
    def test_batch(batch) -> list:
        return [strategy.reduce("SUM", v, axis=None) for v in strategy.run(test_step, args=batch)]

    return _Steps(train_batch, test_batch)


def _mean(step: Callable, dataset) -> tuple[float, float]:
    """Mean loss and accuracy of ``step`` over every batch of ``dataset``."""
    total = np.zeros(3)
    for batch in dataset:
        total += [float(v) for v in step(batch)]
    return total[0] / max(total[2], 1.0), total[1] / max(total[2], 1.0)


@dataclass
class _State:
    """Where training stands after ``epoch`` finished epochs: the history and early stopping's best and patience."""

    history: dict[str, list[float]]
    start: float | None
    best: float
    best_weights: list
    best_epoch: int = 0
    waited: int = 0
    epoch: int = 0
    resumed_from: int = 0


@dataclass(frozen=True)
class _Saver:
    """Saves the state after every finished epoch to a checkpoint (``runs.Checkpoint``), and restores it."""

    checkpoint: object
    full: object
    optimizer: object
    augment: object = None

    def _variables(self) -> dict[str, list]:
        """The model's variables (random seeds too), the optimizer's, and the augmentation's random seeds."""
        augment = self.augment.variables if self.augment is not None else []
        return {"model": self.full.variables, "optimizer": self.optimizer.variables, "augment": augment}

    def save(self, state: _State) -> None:
        record = {k: getattr(state, k) for k in ("history", "start", "best_epoch", "waited", "epoch")}
        record["best"] = None if np.isinf(state.best) else state.best
        arrays = {k: [np.array(v) for v in vs] for k, vs in self._variables().items()}
        self.checkpoint.save(record, {**arrays, "best": state.best_weights})

    def restore(self) -> _State | None:
        """The saved state, its weights and optimizer slots put back; None when there is none that fits."""
        loaded = self.checkpoint.load()
        if loaded is None:
            return None
        record, groups = loaded
        variables = [v for vs in self._variables().values() for v in vs]
        values = [a for name in self._variables() for a in groups.get(name, [])]
        fits = len(values) == len(variables) and len(groups.get("best", [])) == len(self.full.weights)
        if not fits or any(tuple(v.shape) != a.shape for v, a in zip(variables, values, strict=True)):
            return None
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)
        best = np.inf if record["best"] is None else record["best"]
        fields = ("best_epoch", "waited", "epoch", "epoch")
        return _State(record["history"], record["start"], best, groups["best"], *(record[k] for k in fields))


def _fresh(full, steps: _Steps, val_ds) -> _State:
    """The state before the first epoch: with val, the starting model's val loss counts as epoch 0."""
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    start = None
    if val_ds is not None:
        history.update(val_loss=[], val_accuracy=[])
        start = _mean(steps.test, val_ds)[0]
    return _State(history, start, start if start is not None else np.inf, full.get_weights())


def _epochs(
    full, steps: _Steps, train_ds, val_ds, recipe: FineTuneRecipe, progress: Callable | None, saver: _Saver | None
) -> _State:
    """Train epoch by epoch; with val, stop early on its loss (the start counting as epoch 0) and keep the best.

    With ``saver``, every finished epoch is saved, and a saved state is resumed: the training shuffle is moved
    on by the epochs it holds (each new pass over ``train_ds`` reshuffles), so the run continues as it would have.
    """
    state = (saver.restore() if saver else None) or _fresh(full, steps, val_ds)
    for _ in range(state.resumed_from):
        iter(train_ds)
    history = state.history
    while state.epoch < recipe.epochs and (val_ds is None or state.waited < recipe.patience):
        state.epoch += 1
        loss, acc = _mean(steps.train, train_ds)
        history["loss"].append(round(loss, 6))
        history["accuracy"].append(round(acc, 6))
        monitored = loss
        if val_ds is not None:
            monitored, vacc = _mean(steps.test, val_ds)
            history["val_loss"].append(round(monitored, 6))
            history["val_accuracy"].append(round(vacc, 6))
        if progress:
            progress(state.epoch, recipe.epochs, {k: v[-1] for k, v in history.items()})
        if val_ds is None:
            state.best_epoch = state.epoch
        elif monitored < state.best - 1e-6:
            state.best, state.best_weights, state.best_epoch = monitored, full.get_weights(), state.epoch
            state.waited = 0
        else:
            state.waited += 1
        if saver:
            saver.save(state)
    if val_ds is not None:
        full.set_weights(state.best_weights)
    return state


@cluster_failures()
def fine_tune(
    build: Callable,
    photos: Photos,
    train: Split,
    val: Split | None,
    recipe: FineTuneRecipe,
    *,
    class_weights: dict[int, float] | None = None,
    seed: int = 0,
    strategy=None,
    progress: Callable[[int, int, dict], None] | None = None,
    checkpoint=None,
) -> Result:
    """Build the pixels-in model, unfreeze the recipe's backbone layers and train end to end with Adam.

    ``build`` returns the models (``run.Built``) with the head already trained on stored features;
    it is called inside ``strategy``'s scope (a tf.distribute strategy; None trains in this process
    alone). Every worker of a multi-worker strategy runs this same loop. The learning rate (the
    recipe's, ``resolved``) decays to 0 along a cosine over its epochs. With a val split, early
    stopping watches its loss, counting the starting model as epoch 0, and restores the best weights;
    without one, every epoch runs and the last weights are kept. Keras' ``fit`` is not used: it fails
    under MultiWorkerMirroredStrategy (keras-team/keras#20585). With ``checkpoint`` (a ``runs.Checkpoint``)
    every finished epoch is saved there, and a run killed after epoch k resumes from it at epoch k + 1.
    """
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    batch_size = min(recipe.batch_size, len(train.labels))
    built, unfrozen, optimizer = _set_up(build, recipe, strategy, recipe.epochs * (len(train.labels) // batch_size))
    full = built.views
    augment = augmenter(recipe.augment, seed) if recipe.augment else None
    train_ds = strategy.experimental_distribute_dataset(
        image_dataset(photos, train, batch_size, augment=augment, seed=seed, training=True)
    )
    val_ds = (
        strategy.experimental_distribute_dataset(image_dataset(photos, val, batch_size))
        if val is not None and len(val.labels)
        else None
    )
    steps = _batch_steps(full, optimizer, strategy, class_weights, batch_size)
    saver = _Saver(checkpoint, full, optimizer, augment) if checkpoint is not None else None
    state = _epochs(full, steps, train_ds, val_ds, recipe, progress, saver)
    start = None if state.start is None else round(state.start, 6)
    return Result(built.model, full, state.history, unfrozen, start, state.best_epoch, state.resumed_from)


def predict(model, photos: Photos, split: Split, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Probabilities of a model taking views on a stored split's images, with the labels and paths of those it
    could read."""
    paths = photos.paths(split)
    probs, kept, _ = apply_model(model, paths, photos.size, photos.resize, batch_size)
    return probs, np.asarray(split.labels)[kept], [paths[i] for i in kept]
