"""Serializable Keras layers that make a saved model take raw RGB pixels."""

from __future__ import annotations

import importlib

import keras


@keras.saving.register_keras_serializable(package="tlcli")
class Preprocess(keras.layers.Layer):
    """Apply a keras.applications module's own ``preprocess_input`` to [0, 255] RGB pixels."""

    def __init__(self, module: str, **kwargs):
        super().__init__(**kwargs)
        self.module = module
        self._fn = importlib.import_module(f"keras.applications.{module}").preprocess_input

    def call(self, inputs):
        return self._fn(keras.ops.cast(inputs, "float32"))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "module": self.module}


@keras.saving.register_keras_serializable(package="tlcli")
class HorizontalFlip(keras.layers.Layer):
    """Mirror images left to right (deterministic, used for flip-averaged features)."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-2)

    def compute_output_shape(self, input_shape):
        return input_shape


def feature_model(backbone, flip_average: bool) -> keras.Model:
    """Pixels (size, size, 3) in [0, 255] -> pooled backbone features, optionally averaged with the mirror image."""
    size = backbone.size
    inputs = keras.Input((size, size, 3), name="pixels")
    pre = Preprocess(backbone.spec.module, name="preprocess")
    features = backbone.model(pre(inputs))
    if flip_average:
        mirrored = backbone.model(pre(HorizontalFlip(name="mirror")(inputs)))
        features = keras.layers.Average(name="flip_average")([features, mirrored])
    return keras.Model(inputs, features, name="features")
