"""The Keras layers of runs saved before model.keras was built from Keras' own layers (``portable``).

Registered so those runs still load in evaluate, predict, export, adversarial and ideal-image; new
models do not use them.
"""

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
