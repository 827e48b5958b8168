"""What a network sees: the ideal image of a class (gradient ascent from noise) and feature-map grids."""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from tlcli.errors import UsageError

DEFAULT_STEPS = 150
DEFAULT_LR = 4.0
DEFAULT_TV_WEIGHT = 0.4
DEFAULT_L2_WEIGHT = 0.0
DEFAULT_JITTER = 8
DEFAULT_SCALE = 0.1
START_NOISE = 8.0


def total_variation(image: np.ndarray) -> float:
    """Mean absolute difference between horizontally and vertically neighbouring pixels, in pixel levels."""
    x = np.asarray(image, np.float64)
    dy = np.abs(np.diff(x, axis=0)).mean()
    dx = np.abs(np.diff(x, axis=1)).mean()
    return float((dx + dy) / 2)


def _tv(x):
    import tensorflow as tf

    dy = tf.reduce_mean(tf.abs(x[1:] - x[:-1]))
    dx = tf.reduce_mean(tf.abs(x[:, 1:] - x[:, :-1]))
    return (dx + dy) / 2


def ideal_image(
    clf,
    target_index: int,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    tv_weight: float = DEFAULT_TV_WEIGHT,
    l2_weight: float = DEFAULT_L2_WEIGHT,
    jitter: int = DEFAULT_JITTER,
    scale: float = DEFAULT_SCALE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    gif_every: int | None = None,
) -> dict:
    """Adam ascent (pixel units) from seeded grey noise on log p(target) - tv_weight * TV - l2_weight * L2.

    Each step sees the image rolled by up to ``jitter`` px and zoomed by up to ``scale``, so the result survives both.
    """
    import tensorflow as tf

    if steps < 1:
        raise UsageError(f"--steps must be at least 1, not {steps}")
    if lr <= 0:
        raise UsageError(f"--lr must be positive, not {lr:g}")
    if tv_weight < 0 or l2_weight < 0 or jitter < 0:
        raise UsageError("--tv-weight, --l2-weight and --jitter must not be negative")
    if not 0 <= scale < 0.5:
        raise UsageError(f"--scale is a fraction in [0, 0.5), not {scale:g}")
    size = clf.size
    rng = np.random.default_rng(seed)
    start = np.clip(127.5 + rng.normal(0, START_NOISE, (size, size, 3)), 0, 255).astype(np.float32)
    shifts = rng.integers(-jitter, jitter + 1, (steps, 2)).astype(np.int32)
    zooms = (1.0 + rng.uniform(-scale, scale, steps)).astype(np.float32)

    x = tf.Variable(start)
    m = tf.Variable(tf.zeros_like(start))
    v = tf.Variable(tf.zeros_like(start))
    t = tf.Variable(0.0)
    b1, b2, eps = 0.9, 0.999, 1e-8
    target = int(target_index)

    @tf.function
    def step(shift, zoom):
        with tf.GradientTape() as tape:
            seen = tf.roll(x, shift, axis=[0, 1])
            if scale:
                new = tf.cast(tf.round(size * zoom), tf.int32)
                seen = tf.image.resize(seen, tf.stack([new, new]))
                seen = tf.image.resize_with_crop_or_pad(seen - 127.5, size, size) + 127.5
                seen = tf.ensure_shape(seen, (size, size, 3))
            log_p = clf.log_probs(seen[None])[0, target]
            tv = _tv(x)
            l2 = tf.reduce_mean(tf.square((x - 127.5) / 255.0))
            loss = -log_p + tv_weight * tv + l2_weight * l2
        g = tape.gradient(loss, x)
        t.assign_add(1.0)
        m.assign(b1 * m + (1 - b1) * g)
        v.assign(b2 * v + (1 - b2) * tf.square(g))
        m_hat = m / (1 - tf.pow(b1, t))
        v_hat = v / (1 - tf.pow(b2, t))
        x.assign(tf.clip_by_value(x - lr * m_hat / (tf.sqrt(v_hat) + eps), 0.0, 255.0))
        return log_p

    def snapshot() -> np.ndarray:
        return np.round(x.numpy()).astype(np.uint8)

    frames = [snapshot()] if gif_every else []
    began = time.perf_counter()
    for i in range(steps):
        step(tf.constant(shifts[i]), tf.constant(zooms[i]))
        if gif_every and ((i + 1) % gif_every == 0 or i + 1 == steps):
            frames.append(snapshot())
        if progress:
            progress(i + 1, steps)
    seconds = time.perf_counter() - began
    final = snapshot()
    probs = clf.probabilities(final[None])[0]
    order = np.argsort(-probs)[:5]
    return {
        "image": final,
        "frames": frames,
        "target": clf.classes[target],
        "target_index": target,
        "probability": float(probs[target]),
        "top": [{"class": clf.classes[i], "index": int(i), "probability": round(float(probs[i]), 4)} for i in order],
        "total_variation": total_variation(final),
        "steps": steps,
        "lr": lr,
        "tv_weight": tv_weight,
        "l2_weight": l2_weight,
        "jitter": jitter,
        "scale": scale,
        "seed": seed,
        "size": size,
        "seconds": round(seconds, 3),
    }


def upscale(image: np.ndarray, factor: int) -> Image.Image:
    """A PIL image enlarged ``factor`` times with nearest-neighbour (every pixel stays visible as it is)."""
    im = Image.fromarray(np.asarray(image, np.uint8))
    return im if factor == 1 else im.resize((im.width * factor, im.height * factor), Image.NEAREST)


def gif_bytes(frames: list[np.ndarray], factor: int = 1, duration_ms: int = 80) -> bytes:
    """Encode frames as a looping GIF in memory; the last frame is held longer."""
    import io

    ims = [upscale(f, factor) for f in frames]
    durations = [duration_ms] * (len(ims) - 1) + [1500]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=durations, loop=0, optimize=False)
    return buf.getvalue()


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


def feature_grid(backbone, layer_name: str, pixels: np.ndarray, n: int = 16, tile: int | None = None) -> dict:
    """A grid image: the photo, then the strongest channels of ``layer_name``, each min-max normalised.

    Returns the grid as uint8 RGB plus which channels were shown and their mean activations.
    """
    fm = feature_maps(backbone, layer_name, pixels, n)
    tile = tile or max(64, min(160, pixels.shape[0]))
    photo = np.asarray(Image.fromarray(np.asarray(pixels, np.uint8)).resize((tile, tile), Image.BILINEAR))
    tiles = [photo]
    for k in range(fm["maps"].shape[-1]):
        a = fm["maps"][..., k].astype(np.float64)
        span = a.max() - a.min()
        norm = (a - a.min()) / span if span > 0 else np.zeros_like(a)
        coloured = Image.fromarray(colormap(norm)).resize((tile, tile), Image.NEAREST)
        tiles.append(np.asarray(coloured))
    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    gap = 2
    grid = np.full((rows * tile + (rows + 1) * gap, cols * tile + (cols + 1) * gap, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = gap + r * (tile + gap), gap + c * (tile + gap)
        grid[y : y + tile, x : x + tile] = t
    channels = [{"channel": int(c), "mean": round(float(fm["means"][c]), 5)} for c in fm["channels"]]
    return {"image": grid, "layer": fm["layer"], "shape": fm["shape"], "channels": channels}
