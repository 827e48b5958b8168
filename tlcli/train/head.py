"""A softmax head on stored features: built, fitted with early stopping, refitted on train+val.

Used by train-head (``trainer``) and by cross-validation, which fits one head per fold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from tlcli.store.features import ALIGN, Split
from tlcli.train.recipes import HEAD, HeadRecipe

Progress = Callable[[int, int, dict], None]


def seeded(seed: int) -> None:
    """Fix Python, NumPy and TensorFlow seeds and make TensorFlow ops deterministic, so a seed redoes a run."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def as_tensor(array: np.ndarray):
    """``array`` as a TensorFlow tensor sharing its memory where TensorFlow can (a writable C-contiguous array on
    a ``features.ALIGN`` boundary, as ``Store.splits`` reads them), else a copy: a million stored vectors are then
    held once, not twice."""
    import tensorflow as tf

    if array.flags.c_contiguous and array.flags.writeable and array.ctypes.data % ALIGN == 0 and array.size:
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    return tf.constant(array)


def probabilities(head, features: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """The head's class probabilities for ``features``, a chunk of rows at a time (Keras' ``predict`` would first
    copy them all into its dataset)."""
    parts = [np.asarray(head(features[i : i + chunk], training=False)) for i in range(0, len(features), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, head.output_shape[-1]), np.float32)


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Per-class loss weights inversely proportional to each class's count (0 for a class with no images)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return {i: float(w) for i, w in enumerate(weights)}


def build_head(dim: int, n_classes: int, recipe: HeadRecipe = HEAD):
    """Dropout + dense softmax on pooled features."""
    import keras

    inputs = keras.Input((dim,), name="features")
    x = keras.layers.Dropout(recipe.dropout, name="head_dropout")(inputs)
    outputs = keras.layers.Dense(
        n_classes,
        activation="softmax",
        kernel_regularizer=keras.regularizers.l2(recipe.l2) if recipe.l2 else None,
        name="predictions",
    )(x)
    return keras.Model(inputs, outputs, name="head")


def _epoch_step(head, train: Split, recipe: HeadRecipe, weights: dict[int, float] | None) -> Callable[[], tuple]:
    """One compiled epoch of mini-batch Adam over ``train`` in a seeded random order: (mean loss, accuracy)."""
    import keras
    import tensorflow as tf

    x = as_tensor(train.features)
    y = tf.constant(train.labels)
    w = tf.constant(
        np.asarray([weights[int(c)] for c in train.labels] if weights else np.ones(len(train.labels)), np.float32)
    )
    n = len(train.labels)
    batch_size = min(recipe.batch_size, n)
    steps = n // batch_size
    optimizer = keras.optimizers.Adam(recipe.learning_rate)
    ce = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    variables = head.trainable_variables
    rng = tf.random.Generator.from_seed(recipe.seed)

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

    return epoch


def _scorer(head, split: Split) -> Callable[[], tuple]:
    """A compiled (mean loss, accuracy) of ``head`` on ``split``."""
    import keras
    import tensorflow as tf

    xs, ys = as_tensor(split.features), tf.constant(split.labels)
    ce = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    @tf.function
    def score() -> tuple:
        probs = head(xs, training=False)
        loss = tf.reduce_mean(ce(ys, probs))
        return loss, tf.reduce_mean(tf.cast(tf.argmax(probs, 1, output_type=ys.dtype) == ys, tf.float32))

    return score


def fit_head(
    head,
    train: Split,
    val: Split | None = None,
    recipe: HeadRecipe = HEAD,
    *,
    class_weights: dict[int, float] | None = None,
    progress: Progress | None = None,
) -> dict[str, list[float]]:
    """Mini-batch Adam on in-memory features, one compiled step per epoch; early stopping restores the best weights.

    Keras' ``fit`` spends ~70 ms of bookkeeping per epoch, which on a few thousand stored vectors is
    nearly all of the time; running each epoch as one graph keeps head training in seconds. Uses the
    recipe's epochs, batch size, learning rate, patience and seed.
    """
    epoch = _epoch_step(head, train, recipe, class_weights)
    score = _scorer(head, val) if val is not None else None
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    if val is not None:
        history.update(val_loss=[], val_accuracy=[])
    best, best_weights, waited = np.inf, head.get_weights(), 0
    for e in range(recipe.epochs):
        loss, acc = epoch()
        history["loss"].append(round(float(loss), 6))
        history["accuracy"].append(round(float(acc), 6))
        monitored = float(loss)
        if score is not None:
            vloss, vacc = score()
            history["val_loss"].append(round(float(vloss), 6))
            history["val_accuracy"].append(round(float(vacc), 6))
            monitored = float(vloss)
        if progress:
            progress(e + 1, recipe.epochs, {k: v[-1] for k, v in history.items()})
        if monitored < best - 1e-6:
            best, best_weights, waited = monitored, head.get_weights(), 0
        else:
            waited += 1
            if waited >= recipe.patience:
                break
    head.set_weights(best_weights)
    return history


def fit_and_refit(
    train: Split,
    val: Split,
    n_classes: int,
    recipe: HeadRecipe = HEAD,
    *,
    on_epoch: Progress | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[object, dict[str, list[float]], np.ndarray | None]:
    """Train-head's recipe on feature splits: early stopping on val, then (with ``refit``) a fresh head
    trained on train+val for the best epoch count. Returns the head, its history and the early-stopped
    head's val probabilities (taken before the refit sees the val images; None without val images)."""
    seeded(recipe.seed)
    head = build_head(train.features.shape[1], n_classes, recipe)
    has_val = len(val.labels) > 0
    weights = class_weights(train.labels, n_classes) if recipe.class_weights else None
    hist = fit_head(head, train, val if has_val else None, recipe, class_weights=weights, progress=on_epoch)
    log(
        f"stopped after {len(hist['loss'])} epochs"
        + (f", best val loss {min(hist['val_loss']):.4f}" if has_val else "")
    )
    val_probs = probabilities(head, val.features) if has_val else None
    if recipe.refit and has_val:
        refit_epochs = int(np.argmin(hist["val_loss"])) + 1
        both = Split.joined([train, val])
        log(f"refit on train+val ({len(both.labels)} images) for {refit_epochs} epochs")
        seeded(recipe.seed)
        head = build_head(train.features.shape[1], n_classes, recipe)
        again = dataclasses.replace(recipe, epochs=refit_epochs, patience=refit_epochs + 1)
        weights = class_weights(both.labels, n_classes) if recipe.class_weights else None
        hist["refit_loss"] = fit_head(head, both, None, again, class_weights=weights)["loss"]
    return head, hist, val_probs
