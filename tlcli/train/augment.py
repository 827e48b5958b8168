"""``--augment``: random flips, zooms, rotations and contrast for fine-tuning, as one resampling per batch.

Keras' RandomFlip, RandomZoom and RandomRotation each resample the whole batch; chained, they cost more
than the network's forward pass at 320 px on a CPU. Here the geometric ones are composed into one
transform per image and the batch is resampled once: by ``tf.image.crop_and_resize`` when there is no
rotation (a flip is a crop box with its sides swapped), else by one projective transform.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

ZOOM = 0.15
"""A zoom crops a window of 85-100% of the side, placed at random (zooming in only: no invented border)."""
ROTATION = 0.05
"""Rotations up to 5% of a full turn (18 degrees) either way, the border filled by reflection."""
CONTRAST = 0.2


class Augment(keras.layers.Layer):
    """Random transforms of a batch of square images (float pixels, 0-255), drawn from a seeded generator.

    The generator's state is one of the layer's variables, so a checkpoint of it resumes the same draws.
    """

    def __init__(self, names: tuple[str, ...], seed: int, **kwargs):
        super().__init__(**kwargs)
        self.names = tuple(names)
        self.generator = keras.random.SeedGenerator(seed)

    def _uniform(self, n, low: float = 0.0, high: float = 1.0):
        return keras.random.uniform((n,), low, high, seed=self.generator)

    def _boxes(self, n):
        """Crop boxes (y1, x1, y2, x2) in [0, 1]: a random zoom window, mirrored for a flip."""
        side = self._uniform(n, 1.0 - ZOOM, 1.0) if "zoom" in self.names else tf.ones((n,))
        y1 = self._uniform(n) * (1.0 - side)
        x1 = self._uniform(n) * (1.0 - side)
        x2 = x1 + side
        if "flip" in self.names:
            flip = self._uniform(n) < 0.5
            x1, x2 = tf.where(flip, x2, x1), tf.where(flip, x1, x2)
        return tf.stack([y1, x1, y1 + side, x2], axis=1)

    def _rotated(self, images, boxes):
        """Each image's crop box and a rotation about its centre as one projective transform (output to input)."""
        n, size = tf.shape(images)[0], tf.cast(tf.shape(images)[1], tf.float32)
        angle = self._uniform(n, -ROTATION * 2 * math.pi, ROTATION * 2 * math.pi)
        sy, sx = (boxes[:, 2] - boxes[:, 0]), (boxes[:, 3] - boxes[:, 1])
        cy, cx = (boxes[:, 0] + boxes[:, 2]) / 2 * size, (boxes[:, 1] + boxes[:, 3]) / 2 * size
        cos, sin, half = tf.cos(angle), tf.sin(angle), size / 2
        a0, a1, b0, b1 = cos * sx, -sin * sx, sin * sy, cos * sy
        a2, b2 = cx - a0 * half - a1 * half, cy - b0 * half - b1 * half
        zeros = tf.zeros_like(a0)
        transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        return keras.ops.image.affine_transform(images, transforms, fill_mode="reflect")

    def call(self, images, training: bool = True):
        if not training or not self.names:
            return images
        n = tf.shape(images)[0]
        if "rotate" in self.names:
            images = self._rotated(images, self._boxes(n))
        elif "flip" in self.names or "zoom" in self.names:
            images = tf.image.crop_and_resize(images, self._boxes(n), tf.range(n), tf.shape(images)[1:3])
        if "contrast" in self.names:
            factor = tf.reshape(self._uniform(n, 1.0 - CONTRAST, 1.0 + CONTRAST), (-1, 1, 1, 1))
            mean = tf.reduce_mean(images, axis=(1, 2, 3), keepdims=True)
            images = tf.clip_by_value((images - mean) * factor + mean, 0.0, 255.0)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape
