"""TensorFlow functions an exported run serves: encoded image bytes or pixels in, class names and probabilities out.

The bytes are decoded in the graph as tlcli decodes files: a JPEG at the reduced DCT scale PIL's
``draft`` picks (never smaller than the input size on either side) with the accurate integer DCT,
which gives the very pixels PIL does; PNG transparency composited on white; GIF's first frame.
EXIF orientation is not applied (tlcli applies it): serve upright photos.
"""

from __future__ import annotations

from collections.abc import Callable

from tlcli.data import images
from tlcli.models.portable import VIEWS_MODEL, takes_image, view_layer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _jpeg(data, size: int):
    """A JPEG decoded at 1/8, 1/4, 1/2 or full scale: the smallest that keeps both sides at least ``size``."""
    import tensorflow as tf

    shape = tf.io.extract_jpeg_shape(data)
    scale = tf.minimum(shape[0] // size, shape[1] // size)

    def at(ratio: int) -> Callable:
        return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")

    return tf.case([(scale >= 8, at(8)), (scale >= 4, at(4)), (scale >= 2, at(2))], default=at(1))


def _png(data):
    """A PNG as 8-bit RGB, transparency composited on white."""
    import tensorflow as tf

    rgba = tf.cast(tf.io.decode_png(data, channels=4), tf.float32)
    alpha = rgba[..., 3:] / 255.0
    return tf.cast(tf.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)), tf.uint8)


def decode(data, size: int):
    """One encoded image (JPEG, PNG, GIF, BMP) -> uint8 RGB [height, width, 3], as ``images.photo`` decodes it."""
    import tensorflow as tf

    is_png = tf.equal(tf.strings.substr(data, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE)
    pixels = tf.case(
        [(tf.io.is_jpeg(data), lambda: _jpeg(data, size)), (is_png, lambda: _png(data))],
        default=lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    return tf.ensure_shape(pixels, (None, None, 3))


def image_function(model, meta: dict, *, antialias: bool = True) -> Callable:
    """float32 RGB images [batch, height, width, 3] in [0, 255] -> probabilities, for a run of either format.

    A model that takes one image has its own views replaced only when ``antialias`` is off (TFLite has no
    antialiased resize); a run saved before is given the same view layers, stacked as its input.
    """
    import tensorflow as tf

    policies = images.views(meta["resize"])
    size = meta["input_size"]
    if takes_image(model) and antialias:
        return lambda x: model(x, training=False)
    layers = [view_layer(size, p, antialias=antialias) for p in policies]
    inner = model.get_layer(VIEWS_MODEL) if takes_image(model) else model

    def run(x):
        views = [layer(x, training=False) for layer in layers]
        if takes_image(model):
            return inner(views[0] if len(views) == 1 else views, training=False)
        return inner(views[0] if len(views) == 1 else tf.stack(views, axis=1), training=False)

    return run


def outputs(probabilities, classes: list[str]) -> dict:
    """The served result: ``classes`` and ``probabilities`` best first, ``scores`` in the order of labels.txt."""
    import tensorflow as tf

    order = tf.argsort(probabilities, axis=-1, direction="DESCENDING", stable=True)
    return {
        "classes": tf.gather(tf.constant(classes), order),
        "probabilities": tf.gather(probabilities, order, batch_dims=1),
        "scores": probabilities,
    }


def bytes_function(pixels_fn: Callable, meta: dict) -> Callable:
    """A batch of encoded images [batch] (tf.string) -> ``outputs``, each decoded and classified at its own size."""
    import tensorflow as tf

    n = len(meta["classes"])

    def one(data):
        image = tf.cast(decode(data, meta["input_size"]), tf.float32)
        return tf.ensure_shape(pixels_fn(image[None])[0], (n,))

    def serve(data):
        probabilities = tf.map_fn(one, data, fn_output_signature=tf.TensorSpec((n,), tf.float32))
        return outputs(probabilities, list(meta["classes"]))

    return serve
