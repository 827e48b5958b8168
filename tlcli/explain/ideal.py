"""The ideal image of a class: gradient ascent in pixel space from noise, and how it is saved (PNG, GIF)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from tlcli.explain.recipes import IDEAL, IdealRecipe

START_NOISE = 8.0
"""Standard deviation, in pixel levels, of the grey noise the ascent starts from."""


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
    recipe: IdealRecipe = IDEAL,
    *,
    progress: Callable[[int, int], None] | None = None,
    gif_every: int | None = None,
) -> dict:
    """Adam ascent (pixel units) from seeded grey noise on log p(target) - tv_weight * TV - l2_weight * L2.

    Each step sees the image rolled by up to ``jitter`` px and zoomed by up to ``scale``, so the result survives
    both. With ``gif_every``, every that many steps' image is kept in ``frames`` (plus the first and last).
    """
    import tensorflow as tf

    recipe.check()
    start, shifts, zooms = _schedule(recipe, clf.size)
    x = tf.Variable(start)
    step = _ascent_step(clf, x, int(target_index), recipe)
    began = time.perf_counter()
    frames = _optimise(step, x, shifts, zooms, progress=progress, gif_every=gif_every)
    seconds = time.perf_counter() - began
    return _summary(clf, _snapshot(x), int(target_index), recipe, frames=frames, seconds=seconds)


def _schedule(recipe: IdealRecipe, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seeded start (grey noise) and every step's roll and zoom, drawn in this order so a seed repeats."""
    rng = np.random.default_rng(recipe.seed)
    start = np.clip(127.5 + rng.normal(0, START_NOISE, (size, size, 3)), 0, 255).astype(np.float32)
    shifts = rng.integers(-recipe.jitter, recipe.jitter + 1, (recipe.steps, 2)).astype(np.int32)
    zooms = (1.0 + rng.uniform(-recipe.scale, recipe.scale, recipe.steps)).astype(np.float32)
    return start, shifts, zooms


def _seen(x, shift, zoom, size: int, scale: float):
    """The image as one step sees it: rolled by ``shift`` and, unless ``scale`` is 0, zoomed by ``zoom``."""
    import tensorflow as tf

    seen = tf.roll(x, shift, axis=[0, 1])
    if not scale:
        return seen
    new = tf.cast(tf.round(size * zoom), tf.int32)
    seen = tf.image.resize(seen, tf.stack([new, new]))
    seen = tf.image.resize_with_crop_or_pad(seen - 127.5, size, size) + 127.5
    return tf.ensure_shape(seen, (size, size, 3))


class _PixelAdam:
    """Adam on a pixel variable, step size in pixel levels, kept inside [0, 255] after every update."""

    B1, B2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, x, lr: float) -> None:
        import tensorflow as tf

        self.x, self.lr = x, lr
        self.m = tf.Variable(tf.zeros_like(x))
        self.v = tf.Variable(tf.zeros_like(x))
        self.t = tf.Variable(0.0)

    def apply(self, g) -> None:
        import tensorflow as tf

        self.t.assign_add(1.0)
        self.m.assign(self.B1 * self.m + (1 - self.B1) * g)
        self.v.assign(self.B2 * self.v + (1 - self.B2) * tf.square(g))
        m_hat = self.m / (1 - tf.pow(self.B1, self.t))
        v_hat = self.v / (1 - tf.pow(self.B2, self.t))
        self.x.assign(tf.clip_by_value(self.x - self.lr * m_hat / (tf.sqrt(v_hat) + self.EPS), 0.0, 255.0))


def _ascent_step(clf, x, target: int, recipe: IdealRecipe) -> Callable:
    """A traced ``step(shift, zoom)``: the objective's gradient on what the step sees, then Adam on ``x``."""
    import tensorflow as tf

    adam = _PixelAdam(x, recipe.lr)

    @tf.function
    def step(shift, zoom):
        with tf.GradientTape() as tape:
            log_p = clf.log_probs(_seen(x, shift, zoom, clf.size, recipe.scale)[None])[0, target]
            l2 = tf.reduce_mean(tf.square((x - 127.5) / 255.0))
            loss = -log_p + recipe.tv_weight * _tv(x) + recipe.l2_weight * l2
        adam.apply(tape.gradient(loss, x))
        return log_p

    return step


def _snapshot(x) -> np.ndarray:
    return np.round(x.numpy()).astype(np.uint8)


def _optimise(step: Callable, x, shifts, zooms, *, progress, gif_every: int | None) -> list[np.ndarray]:
    """Run every step; returns the frames kept for a GIF (none without ``gif_every``)."""
    import tensorflow as tf

    steps = len(shifts)
    frames = [_snapshot(x)] if gif_every else []
    for i in range(steps):
        step(tf.constant(shifts[i]), tf.constant(zooms[i]))
        if gif_every and ((i + 1) % gif_every == 0 or i + 1 == steps):
            frames.append(_snapshot(x))
        if progress:
            progress(i + 1, steps)
    return frames


def _summary(clf, final: np.ndarray, target: int, recipe: IdealRecipe, *, frames: list, seconds: float) -> dict:
    """The result: the 8-bit image and its frames, how the model scores it, and the recipe that made it."""
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
        **dataclasses.asdict(recipe),
        "size": clf.size,
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
