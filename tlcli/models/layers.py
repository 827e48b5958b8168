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


@keras.saving.register_keras_serializable(package="tlcli")
class FoldViews(keras.layers.Layer):
    """(batch, views, h, w, c) -> (batch * views, h, w, c), so all views go through the backbone as one batch."""

    def call(self, inputs):
        return keras.ops.reshape(inputs, (-1, *inputs.shape[2:]))

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[2:])


@keras.saving.register_keras_serializable(package="tlcli")
class UnfoldViews(keras.layers.Layer):
    """(batch * views, d) -> (batch, views * d): each image's view features side by side."""

    def __init__(self, n_views: int, **kwargs):
        super().__init__(**kwargs)
        self.n_views = n_views

    def call(self, inputs):
        return keras.ops.reshape(inputs, (-1, self.n_views * inputs.shape[-1]))

    def compute_output_shape(self, input_shape):
        return (None, self.n_views * input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "n_views": self.n_views}


def feature_model(backbone, flip_average: bool, n_views: int = 1) -> keras.Model:
    """Pixels in [0, 255] -> pooled backbone features.

    Takes (size, size, 3) pixels, or (n_views, size, size, 3) for multi-view resize policies whose
    views' features are concatenated; with ``flip_average`` each view's features are averaged with
    those of its mirror image.
    """
    size = backbone.size
    shape = (size, size, 3) if n_views == 1 else (n_views, size, size, 3)
    inputs = keras.Input(shape, name="pixels")
    pre = Preprocess(backbone.spec.module, name="preprocess")

    pixels = inputs if n_views == 1 else FoldViews(name="fold_views")(inputs)
    features = backbone.model(pre(pixels))
    if flip_average:
        mirrored = backbone.model(pre(HorizontalFlip(name="mirror")(pixels)))
        features = keras.layers.Average(name="flip_average")([features, mirrored])
    if n_views > 1:
        features = UnfoldViews(n_views, name="unfold_views")(features)
    return keras.Model(inputs, features, name="features")
