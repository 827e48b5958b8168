"""A run's model from Keras' own layers only, so its model.keras loads with plain Keras (no tlcli, safe mode on).

The saved model takes one RGB image in [0, 255] of any size and builds its views inside: a
``Resizing`` layer per view (centre crop, grey pad, squash), each family's ``preprocess_input`` as
a fixed 1x1 affine map (a frozen 1x1 ``Conv2D``), one backbone applied to every view (its weights stored
once), the views' features side by side (``Concatenate``), then the head.
"""

from __future__ import annotations

import importlib

import numpy as np

from tlcli.data import images

VIEWS_MODEL = "views"
"""The name of the inner model (views in, probabilities out) a saved run model holds."""
INTERPOLATION = "bilinear"
"""With antialiasing: the same triangle filter as PIL's BILINEAR, so downscaling a large photo does not alias."""


def view_layer(size: int, policy: str, name: str | None = None, *, antialias: bool = True):
    """The Keras layer that makes one view (``crop``, ``pad`` or ``squash``) of an image at ``size`` x ``size``."""
    import keras

    return keras.layers.Resizing(
        size,
        size,
        interpolation=INTERPOLATION,
        antialias=antialias,
        crop_to_aspect_ratio=policy == "crop",
        pad_to_aspect_ratio=policy == "pad",
        fill_value=float(images.PAD_VALUE),
        name=name or f"{policy}_view",
    )


def affine_preprocess(module: str) -> tuple[np.ndarray, np.ndarray]:
    """A keras.applications module's ``preprocess_input`` as ``x @ kernel + bias`` on RGB pixels.

    Every family's preprocessing is per-pixel affine (scaling, mean subtraction, RGB to BGR; identity
    for the families that preprocess inside the network), so probing it at black and the three unit
    colours recovers it exactly; a non-affine one is refused rather than approximated.
    """
    fn = importlib.import_module(f"keras.applications.{module}").preprocess_input
    probe = np.concatenate([np.zeros((1, 3)), np.eye(3) * 255.0])[None, None]
    out = np.asarray(fn(probe.copy()), np.float64)[0, 0]
    bias, kernel = out[0], (out[1:] - out[0]) / 255.0
    check = np.random.default_rng(0).uniform(0, 255, (1, 4, 4, 3))
    if not np.allclose(np.asarray(fn(check.copy()), np.float64), check @ kernel + bias, atol=1e-4):
        raise ValueError(f"keras.applications.{module}.preprocess_input is not a per-pixel affine map")
    return kernel.astype(np.float32), bias.astype(np.float32)


def preprocess_layer(module: str):
    """A frozen 1x1 ``Conv2D`` holding ``module``'s preprocess_input, or None where it is the identity."""
    import keras

    kernel, bias = affine_preprocess(module)
    if np.array_equal(kernel, np.eye(3, dtype=np.float32)) and not bias.any():
        return None
    layer = keras.layers.Conv2D(3, 1, trainable=False, name="preprocess")
    layer.build((None, None, None, 3))
    layer.set_weights([kernel[None, None], bias])
    return layer


def mirror_layers(size: int) -> list:
    """Left-right mirroring from built-in layers: width moved last, a frozen anti-identity ``Dense``, moved back."""
    import keras

    flip = keras.layers.Dense(size, use_bias=False, trainable=False, name="mirror")
    flip.build((None, size, 3, size))
    flip.set_weights([np.eye(size, dtype=np.float32)[::-1]])
    return [
        keras.layers.Permute((1, 3, 2), name="width_last"),
        flip,
        keras.layers.Permute((1, 3, 2), name="width_back"),
    ]


def features_model(backbone, n_views: int = 1, flip_average: bool = False):
    """Views (``n_views`` inputs of size x size x 3 pixels in [0, 255]) -> the backbone's pooled features, side by side.

    With ``flip_average`` each view's features are averaged with those of its mirror image.
    """
    import keras

    size = backbone.size
    inputs = [keras.Input((size, size, 3), name=f"view_{i}") for i in range(n_views)]
    pre = preprocess_layer(backbone.spec.module)
    mirror = mirror_layers(size) if flip_average else []

    def encode(x):
        return backbone.model(pre(x) if pre is not None else x)

    outputs = []
    for x in inputs:
        features = encode(x)
        if mirror:
            flipped = x
            for layer in mirror:
                flipped = layer(flipped)
            features = keras.layers.Average()([features, encode(flipped)])
        outputs.append(features)
    joined = outputs[0] if n_views == 1 else keras.layers.Concatenate(name="join_views")(outputs)
    return keras.Model(inputs[0] if n_views == 1 else inputs, joined, name="features")


def image_model(views_model, size: int, policy: str, name: str):
    """One RGB image (batch, height, width, 3) in [0, 255], any size -> ``views_model`` of its views."""
    import keras

    image = keras.Input((None, None, 3), name="image")
    # training=False is recorded in the saved graph: left to its default (True), Resizing would pass training
    # mode down the call, and model(x) would run the backbone's batch norms on batch statistics.
    views = [view_layer(size, p)(image, training=False) for p in images.views(policy)]
    return keras.Model(image, views_model(views[0] if len(views) == 1 else views), name=name)


def takes_image(model) -> bool:
    """True for a model taking one image of any size; False for one taking views (as runs saved before did)."""
    return len(model.inputs) == 1 and model.inputs[0].shape[1] is None


def _head(model):
    """The head inside a run's model (one taking an image, or its views model)."""
    return next(layer for layer in model._flatten_layers(include_self=True) if layer.name == "head")


def fold_temperature(model, temperature: float) -> None:
    """Divide the head's final ``Dense`` logits by ``temperature`` in place (kernel and bias), so the softmax it
    ends with gives temperature-scaled probabilities with nothing but the layers already there."""
    dense = _head(model).get_layer("predictions")
    dense.set_weights([w / np.float32(temperature) for w in dense.get_weights()])


def with_features(model):
    """``model`` with the features its head reads put after the probabilities, in one output (batch, classes +
    features), so the one graph that runs a model over files also yields what the unknown score needs."""
    import keras

    views = next((layer for layer in model.layers if layer.name == VIEWS_MODEL), model)
    features = _head(views)._inbound_nodes[-1].input_tensors[0]
    joined = keras.Model(
        views.inputs, keras.layers.Concatenate(name="probs_and_features")([views.output, features]), name=VIEWS_MODEL
    )
    if views is model:
        return joined
    return keras.models.clone_model(model, clone_function=lambda layer: joined if layer is views else layer)
