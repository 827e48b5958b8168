"""Feature maps: a backbone layer's strongest channels for one photo, laid out as a coloured grid beside it."""

from __future__ import annotations

import difflib

import numpy as np
from PIL import Image

from tlcli.errors import UsageError

GAP = 2
"""White pixels between the grid's tiles."""


def _spatial_layers(model) -> list:
    return [
        layer
        for layer in model.layers
        if type(layer).__name__ != "InputLayer" and len(getattr(layer.output, "shape", ())) == 4
    ]


def list_layers(model) -> list[dict]:
    """Layers with a spatial (batch, h, w, channels) output, in order, for ``--list-layers``."""
    return [
        {"name": layer.name, "type": type(layer).__name__, "shape": [int(d) for d in layer.output.shape[1:]]}
        for layer in _spatial_layers(model)
    ]


def get_layer(model, name: str):
    """A spatial layer by name; unknown names list the closest layer names."""
    layers = _spatial_layers(model)
    names = [layer.name for layer in layers]
    if name in names:
        return layers[names.index(name)]
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"layers include {', '.join(names[:4])}, ..."
    raise UsageError(f"{model.name} has no feature-map layer {name!r}; {hint} (see --list-layers)")


_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to an inferno-like RGB uint8 palette (dark = weak, bright = strong)."""
    pos = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    return np.round(_ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac).astype(np.uint8)


def feature_maps(backbone, layer_name: str, pixels: np.ndarray, n: int = 16) -> dict:
    """The ``n`` channels of a layer with the highest mean activation for one photo (uint8 pixels in [0, 255])."""
    import keras

    from tlcli.models.backbones import preprocess_fn

    layer = get_layer(backbone.model, layer_name)
    probe = keras.Model(backbone.model.input, layer.output)
    x = preprocess_fn(backbone.spec)(np.asarray(pixels, np.float32)[None].copy())
    maps = np.asarray(probe(x, training=False))[0]
    means = maps.mean(axis=(0, 1))
    order = np.argsort(-means, kind="stable")[: max(1, n)]
    return {"layer": layer.name, "shape": list(maps.shape), "maps": maps[..., order], "channels": order, "means": means}


def _tile(activation: np.ndarray, tile: int) -> np.ndarray:
    """One channel min-max normalised, coloured and enlarged to ``tile`` pixels."""
    a = activation.astype(np.float64)
    span = a.max() - a.min()
    norm = (a - a.min()) / span if span > 0 else np.zeros_like(a)
    return np.asarray(Image.fromarray(colormap(norm)).resize((tile, tile), Image.NEAREST))


def _grid(tiles: list[np.ndarray], tile: int) -> np.ndarray:
    """Square tiles in a near-square grid, row by row, on white."""
    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    grid = np.full((rows * tile + (rows + 1) * GAP, cols * tile + (cols + 1) * GAP, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = GAP + r * (tile + GAP), GAP + c * (tile + GAP)
        grid[y : y + tile, x : x + tile] = t
    return grid


def feature_grid(backbone, layer_name: str, pixels: np.ndarray, n: int = 16, tile: int | None = None) -> dict:
    """A grid image: the photo, then the strongest channels of ``layer_name``, each min-max normalised.

    Returns the grid as uint8 RGB plus which channels were shown and their mean activations.
    """
    fm = feature_maps(backbone, layer_name, pixels, n)
    tile = tile or max(64, min(160, pixels.shape[0]))
    photo = np.asarray(Image.fromarray(np.asarray(pixels, np.uint8)).resize((tile, tile), Image.BILINEAR))
    tiles = [photo] + [_tile(fm["maps"][..., k], tile) for k in range(fm["maps"].shape[-1])]
    channels = [{"channel": int(c), "mean": round(float(fm["means"][c]), 5)} for c in fm["channels"]]
    return {"image": _grid(tiles, tile), "layer": fm["layer"], "shape": fm["shape"], "channels": channels}
