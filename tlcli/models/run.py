"""A run's model: built from a backbone and a head, or loaded from a run folder (either format)."""

from __future__ import annotations

import os
from typing import NamedTuple

from tlcli.data import images
from tlcli.errors import UsageError
from tlcli.models import backbones
from tlcli.models.portable import VIEWS_MODEL, features_model, image_model
from tlcli.store import files, runs


class Built(NamedTuple):
    """A run's models sharing one set of weights: ``model`` takes one image (what model.keras holds), ``views``
    takes the image's views as tlcli's loader makes them (what fine-tuning trains), ``backbone`` is inside both."""

    model: object
    views: object
    backbone: object


def pixels_model(meta: dict, head) -> Built:
    """Preprocessing + backbone + ``head`` on RGB pixels, from Keras' own layers (``portable``)."""
    import keras

    bb = backbones.build(meta["backbone"], meta.get("alpha"), meta["input_size"], meta["weights"])
    if bb.weights_sha256 != meta.get("weights_sha256"):
        raise UsageError(
            f"the {meta['backbone']} weights changed since extraction "
            f"({meta.get('weights_sha256')} -> {bb.weights_sha256}); re-run 'tlcli extract'"
        )
    features = features_model(bb, len(images.views(meta["resize"])), meta.get("flip_average", False))
    views = keras.Model(features.input, head(features.output), name=VIEWS_MODEL)
    model = image_model(views, bb.size, meta["resize"], f"tlcli_{meta['backbone']}")
    return Built(model, views, bb.model)


def load_run(path: str | os.PathLike):
    """Load a run's inference model and metadata; one-line error when the model file is not a model."""
    import keras

    import tlcli.models.layers  # noqa: F401  (registers the layers of runs saved before portable models)

    run_dir = runs.resolve_run(path)
    meta = files.read_json(run_dir / "meta.json")
    try:
        model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    except Exception as exc:  # Keras raises many types for a damaged archive
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(
            f"{run_dir / 'model.keras'} is not a loadable Keras model ({first}); retrain with 'tlcli train-head'"
        ) from None
    return model, meta, run_dir
