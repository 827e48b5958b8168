"""A differentiable pixels -> class log-probabilities function, from an ImageNet backbone or a trained run.

Attacks and visualisations work in [0, 255] RGB pixel space with the model's own preprocessing
inside the function, so step sizes and budgets are in pixel units.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tlcli.data import images
from tlcli.errors import UsageError
from tlcli.models import backbones
from tlcli.models.portable import takes_image
from tlcli.models.run import load_run

CLASS_INDEX_URL = "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"


@dataclass
class Classifier:
    """log_probs(pixels [b, size, size, 3] float32 in [0, 255]) -> [b, n_classes] log-probabilities."""

    log_probs: Callable
    size: int
    classes: list[str]
    source: str
    model: object
    resize: str = "crop"
    ids: list[str] | None = None

    def resolve(self, name: str) -> int:
        """Class index from a name, WordNet id or index; unknown names list the closest matches."""
        return resolve_class(name, self.classes, self.ids)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Softmax probabilities for a batch of pixel arrays."""
        import tensorflow as tf

        return tf.exp(self.log_probs(tf.constant(pixels, tf.float32))).numpy()

    def top(self, pixels: np.ndarray, k: int = 5) -> list[dict]:
        """Top-k classes of one image as [{class, probability}]."""
        probs = self.probabilities(pixels[None])[0]
        order = np.argsort(-probs)[:k]
        return [{"class": self.classes[i], "index": int(i), "probability": round(float(probs[i]), 4)} for i in order]


def _norm(text: str) -> str:
    return re.sub(r"[\s_\-']+", "_", text.strip().lower())


def resolve_class(name: str, classes: list[str], ids: list[str] | None = None) -> int:
    """Find ``name`` among class names (case, spaces and underscores ignored), ids, or as an index."""
    text = str(name).strip()
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    if ids and text in ids:
        return ids.index(text)
    wanted = _norm(text)
    normalised = [_norm(c) for c in classes]
    if wanted in normalised:
        return normalised.index(wanted)
    close = difflib.get_close_matches(wanted, normalised, n=4, cutoff=0.6)
    hint = f"; closest: {', '.join(classes[normalised.index(c)] for c in close)}" if close else ""
    sample = "" if close else f"; classes include {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}"
    raise UsageError(f"unknown class {name!r}{hint}{sample}")


def imagenet_classes() -> tuple[list[str], list[str]]:
    """ImageNet class names and WordNet ids, from Keras' imagenet_class_index.json (cache or download)."""
    from keras.src.utils import file_utils

    record: list = []
    with backbones.recording_get_file(record):
        path = file_utils.get_file("imagenet_class_index.json", CLASS_INDEX_URL, cache_subdir="models")
    with open(path) as f:
        index = json.load(f)
    return [index[str(i)][1] for i in range(len(index))], [index[str(i)][0] for i in range(len(index))]


def from_backbone(name: str, alpha: float | None = None, weights: str = "imagenet") -> Classifier:
    """The backbone with its 1000-class ImageNet top, at its native size, on pixels in [0, 255]."""
    import keras
    import tensorflow as tf

    from tlcli.models.portable import preprocess_layer

    sp = backbones.spec(name)
    bb = backbones.build(name, alpha, None, weights, include_top=True, classifier_activation=None)
    classes, ids = imagenet_classes()
    inputs = keras.Input((bb.size, bb.size, 3))
    pre = preprocess_layer(sp.module)
    logits = bb.model(pre(inputs) if pre is not None else inputs)
    model = keras.Model(inputs, logits)

    def log_probs(pixels):
        return tf.nn.log_softmax(tf.cast(model(pixels, training=False), tf.float32))

    return Classifier(log_probs, bb.size, classes, f"{bb.key} with ImageNet top", model, "crop", ids)


def from_run(path: str | os.PathLike) -> Classifier:
    """A trained tlcli run on square images at its input size, which are every view of themselves (crop, pad and
    squash of a square agree): fed whole to a model that builds its views, stacked for one saved before."""
    import tensorflow as tf

    model, meta, run_dir = load_run(path)
    n_views = 1 if takes_image(model) else len(images.views(meta["resize"]))

    def log_probs(pixels):
        x = pixels if n_views == 1 else tf.stack([pixels] * n_views, axis=1)
        return tf.math.log(tf.clip_by_value(tf.cast(model(x, training=False), tf.float32), 1e-12, 1.0))

    return Classifier(
        log_probs, meta["input_size"], list(meta["classes"]), f"run {run_dir}", model, images.views(meta["resize"])[0]
    )


def load(backbone: str | None, alpha: float | None, weights: str, run: str | None) -> Classifier:
    """The classifier a command asked for: ``--model RUN`` or ``--backbone NAME`` (with the ImageNet top)."""
    if run:
        return from_run(run)
    return from_backbone(backbone or "mobilenet", alpha, weights)
