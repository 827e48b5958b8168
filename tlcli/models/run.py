"""A run's model: built from a backbone and a head, or loaded from a run folder."""

from __future__ import annotations

import os

from tlcli.data import images
from tlcli.errors import UsageError
from tlcli.models import backbones
from tlcli.store import files, runs


def pixels_model(meta: dict, head) -> tuple:
    """Preprocessing + backbone + ``head`` as one model taking RGB pixels; returns (model, backbone model)."""
    import keras

    from tlcli.models.layers import feature_model

    bb = backbones.build(meta["backbone"], meta.get("alpha"), meta["input_size"], meta["weights"])
    if bb.weights_sha256 != meta.get("weights_sha256"):
        raise UsageError(
            f"the {meta['backbone']} weights changed since extraction "
            f"({meta.get('weights_sha256')} -> {bb.weights_sha256}); re-run 'tlcli extract'"
        )
    features = feature_model(bb, meta.get("flip_average", False), len(images.views(meta["resize"])))
    pixels = keras.Input(images.pixel_shape(bb.size, meta["resize"]), name="pixels")
    return keras.Model(pixels, head(features(pixels)), name=f"tlcli_{meta['backbone']}"), bb.model


def load_run(path: str | os.PathLike):
    """Load a run's inference model and metadata; one-line error when the model file is not a model."""
    import keras

    import tlcli.models.layers  # noqa: F401  (registers the custom layers for deserialisation)

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
