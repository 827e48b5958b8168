"""Fine-tuning: unfreeze the top of the backbone and train backbone + head end to end on augmented images.

BatchNormalization layers stay frozen: in Keras 3 a BN layer with ``trainable=False`` runs in inference
mode even when the model is called with ``training=True``, so its moving statistics (the ImageNet ones
the rest of the network was trained against) are neither updated nor replaced by small-batch statistics.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlcli import images
from tlcli.errors import UsageError
from tlcli.features import Split

AUGMENTATIONS = ("flip", "rotate", "zoom", "contrast")


@dataclass(frozen=True)
class Options:
    """What to unfreeze and how to train end to end; ``learning_rate`` None means the head's / 10."""

    layers: int | None = None
    from_layer: str | None = None
    learning_rate: float | None = None
    epochs: int = 10
    patience: int = 3
    batch_size: int = 32
    augment: tuple[str, ...] = ()
    cache: bool = True


def parse_augment(spec: str | None) -> tuple[str, ...]:
    """``flip,rotate,zoom,contrast`` (any subset, comma-separated; ``none`` or empty for no augmentation)."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return ()
    names = [s.strip().lower() for s in spec.split(",")]
    bad = [n for n in names if n not in AUGMENTATIONS]
    if bad or len(set(names)) != len(names):
        raise UsageError(
            f"unknown or repeated augmentation in --augment {spec!r}; use any of {','.join(AUGMENTATIONS)} or none"
        )
    return tuple(names)


def options(
    layers: int | None = None,
    from_layer: str | None = None,
    learning_rate: float | None = None,
    epochs: int | None = None,
    patience: int | None = None,
    batch_size: int | None = None,
    augment: str | None = None,
) -> Options | None:
    """Fine-tuning options from the command line: None when neither a layer count nor a layer is given.

    The other settings only mean something with fine-tuning, so giving them alone is a usage error.
    """
    given = {
        "learning_rate": learning_rate,
        "epochs": epochs,
        "patience": patience,
        "batch_size": batch_size,
        "augment": parse_augment(augment) if augment is not None else None,
    }
    if layers is None and from_layer is None:
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            flags = ", ".join("--augment" if k == "augment" else f"--fine-tune-{k.replace('_', '-')}" for k in extra)
            raise UsageError(f"{flags} only apply to fine-tuning; add --fine-tune-layers N or --fine-tune-from LAYER")
        return None
    result = Options(layers, from_layer, **{k: v for k, v in given.items() if v is not None})
    check(result)
    return result


def check(options: Options) -> None:
    """Reject option values that no backbone could satisfy, before any training starts."""
    if options.layers is not None and options.from_layer is not None:
        raise UsageError("give --fine-tune-layers or --fine-tune-from, not both")
    if options.layers is not None and options.layers < 1:
        raise UsageError(f"--fine-tune-layers must be at least 1, not {options.layers}")
    if options.learning_rate is not None and not options.learning_rate > 0:
        raise UsageError(f"--fine-tune-lr must be above 0, not {options.learning_rate:g}")
    if options.epochs < 1 or options.patience < 1 or options.batch_size < 1:
        raise UsageError("--fine-tune-epochs, --fine-tune-patience and --fine-tune-batch-size must be at least 1")


def unfreeze(backbone, layers: int | None, from_layer: str | None) -> list[str]:
    """Make the top ``layers`` weight-holding layers (or every layer from ``from_layer`` up) trainable.

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
    import keras

    make = {
        "flip": lambda s: keras.layers.RandomFlip("horizontal", seed=s),
        "rotate": lambda s: keras.layers.RandomRotation(0.05, seed=s),
        "zoom": lambda s: keras.layers.RandomZoom((-0.15, 0.0), seed=s),
        "contrast": lambda s: keras.layers.RandomContrast(0.2, seed=s),
    }
    return keras.Sequential([make[n](seed + i) for i, n in enumerate(names)], name="augment")


def image_dataset(
    data_dir: str | os.PathLike,
    split: Split,
    size: int,
    resize: str,
    batch_size: int,
    augment: tuple[str, ...] = (),
    seed: int = 0,
    training: bool = False,
    cache: bool = False,
):
    """A tf.data pipeline of (float32 pixels, label) batches for a stored split, decoded by tlcli.images.

    Training data are shuffled every epoch and augmented per view; files gone since extraction are a
    usage error rather than a silently smaller split.
    """
    import tensorflow as tf

    root = Path(data_dir)
    paths = [str(root / p) for p in split.paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(
            f"{len(missing)} image(s) of the feature store are gone from {root} (e.g. {missing[0]}); "
            "re-run 'tlcli extract'"
        )
    labels = tf.data.Dataset.from_tensor_slices(np.asarray(split.labels, np.int64))
    ds = tf.data.Dataset.zip(images.decoded(paths, size, resize), labels).map(lambda d, y: (d[0], y))
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    shape = images.pixel_shape(size, resize)
    layer = augmenter(augment, seed) if training and augment else None

    def prepare(x, y):
        x = tf.cast(x, tf.float32)
        if layer is not None:
            flat = layer(tf.reshape(x, (-1, size, size, 3)), training=True)
            x = tf.reshape(flat, (-1, *shape))
        return x, y

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _early_stopping(start: float | None, **kwargs):
    """Keras EarlyStopping for which the starting model (head on the frozen backbone) counts as epoch 0.

    With a validation loss ``start`` to beat, a fine-tuning run that never improves on it restores the
    starting weights instead of the least bad fine-tuned epoch (``best_epoch`` -1).
    """
    import keras

    class EarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if start is not None:
                self.best, self.best_weights, self.best_epoch = start, self.model.get_weights(), -1

    return EarlyStopping(**kwargs)


@dataclass
class Result:
    """A fine-tuned model and how it got there; ``best_epoch`` 0 means no epoch beat the starting model."""

    model: object
    history: dict[str, list[float]]
    unfrozen: list[str]
    start_val_loss: float | None
    best_epoch: int


def fine_tune(
    build: Callable[[], tuple],
    data_dir: str | os.PathLike,
    train: Split,
    val: Split | None,
    size: int,
    resize: str,
    options: Options,
    learning_rate: float,
    class_weights: dict[int, float] | None,
    seed: int,
    progress: Callable[[int, int, dict], None] | None = None,
) -> Result:
    """Build the pixels-in model, unfreeze the chosen backbone layers and train end to end.

    ``build`` returns (full model, backbone model) with the head already trained on stored features.
    Early stopping watches validation loss (training loss without a val split) and restores the best
    epoch's weights, the starting ones included.
    """
    import keras

    full, backbone = build()
    unfrozen = unfreeze(backbone, options.layers, options.from_layer)
    full.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    train_ds = image_dataset(
        data_dir, train, size, resize, options.batch_size, options.augment, seed, training=True, cache=options.cache
    )
    val_ds = (
        image_dataset(data_dir, val, size, resize, options.batch_size, cache=options.cache)
        if val is not None and len(val.labels)
        else None
    )
    start = full.evaluate(val_ds, verbose=0, return_dict=True)["loss"] if val_ds is not None else None
    stopper = _early_stopping(
        start,
        monitor="val_loss" if val_ds is not None else "loss",
        patience=options.patience,
        restore_best_weights=True,
    )
    callbacks = [stopper]
    if progress:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: progress(epoch + 1, options.epochs, dict(logs or {}))
            )
        )
    fitted = full.fit(
        train_ds,
        validation_data=val_ds,
        epochs=options.epochs,
        class_weight=class_weights,
        callbacks=callbacks,
        verbose=0,
    )
    history = {k: [round(float(v), 6) for v in vs] for k, vs in fitted.history.items()}
    return Result(full, history, unfrozen, None if start is None else round(float(start), 6), stopper.best_epoch + 1)


def predict(
    model, data_dir: str | os.PathLike, split: Split, size: int, resize: str, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a pixels-in model on a stored split's images, with the labels of those it could read."""
    paths = [str(Path(data_dir) / p) for p in split.paths]
    probs, kept, _ = images.apply_model(model, paths, size, resize, batch_size)
    return probs, np.asarray(split.labels)[kept]
