"""Adversarial examples in pixel space: gradient descent with an L2 penalty (gd), FGSM and L-inf PGD.

Success is always judged on the image rounded to 8 bits, exactly as it is saved, so a written PNG
still fools the model when it is loaded again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlcli.data import images
from tlcli.errors import UsageError
from tlcli.explain.recipes import ATTACK, AttackRecipe
from tlcli.models.classifier import Classifier
from tlcli.store import files


def norms(original: np.ndarray, adversarial: np.ndarray) -> dict:
    """L-inf and L2 of the change in pixel levels, and PSNR in dB."""
    diff = adversarial.astype(np.float64) - original.astype(np.float64)
    mse = float(np.mean(diff**2))
    return {
        "linf": float(np.abs(diff).max()),
        "l2": round(float(np.sqrt(np.sum(diff**2))), 3),
        "psnr_db": round(10 * math.log10(255.0**2 / mse), 2) if mse > 0 else None,
    }


def attack(
    clf: Classifier,
    pixels: np.ndarray,
    target: int | None = None,
    recipe: AttackRecipe = ATTACK,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Perturb uint8 ``pixels`` until the model predicts ``target`` (or, with target None, any other class).

    ``pgd`` keeps every pixel within ``eps`` levels of the original; ``fgsm`` takes one step of
    ``eps``; ``gd`` (the lesson's method) runs Adam on the pixels against the target's loss plus
    ``l2_weight`` x mean squared change, without a hard budget.
    """
    import tensorflow as tf

    recipe.check()
    started = time.perf_counter()
    original = np.asarray(pixels, np.uint8)
    x0 = tf.constant(original[None].astype(np.float32))
    before = clf.top(original.astype(np.float32))
    goal = _Goal(source=before[0]["index"], target=target)
    advance = _method_step(recipe, _loss_gradient(clf, x0, goal, recipe), x0)
    rounded, top, taken = _search(clf, advance, _start(recipe, x0), original, goal, recipe, progress=progress)
    return {
        "adversarial": rounded,
        "original": original,
        "method": recipe.method,
        "targeted": goal.targeted,
        "target": clf.classes[target] if goal.targeted else None,
        "source": clf.classes[goal.source],
        "success": goal.reached(top),
        "predicted": clf.classes[top],
        "before": before,
        "after": clf.top(rounded.astype(np.float32)),
        "eps": recipe.eps if recipe.method != "gd" else None,
        "steps": taken,
        **norms(original, rounded),
        "seconds": round(time.perf_counter() - started, 3),
    }


@dataclass(frozen=True)
class _Goal:
    """What counts as fooled: the top-1 is ``target``, or with no target anything but ``source``."""

    source: int
    target: int | None

    @property
    def targeted(self) -> bool:
        return self.target is not None

    def reached(self, top: int) -> bool:
        return top == self.target if self.targeted else top != self.source


def _loss_gradient(clf: Classifier, x0, goal: _Goal, recipe: AttackRecipe) -> Callable:
    """Traced ``x -> (loss, d loss / d x)``: -log p(target), or log p(source) untargeted; gd adds its L2 term."""
    import tensorflow as tf

    index = tf.constant([goal.target if goal.targeted else goal.source])

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            log_p = tf.gather(clf.log_probs(x)[0], index[0])
            loss = -log_p if goal.targeted else log_p
            if recipe.method == "gd":
                loss += recipe.l2_weight * tf.reduce_mean(tf.square(x - x0))
        return loss, tape.gradient(loss, x)

    return gradient


def _start(recipe: AttackRecipe, x0):
    """Where the search starts: the photo, or for PGD with ``random_start`` a seeded point in the eps-ball."""
    import tensorflow as tf

    if recipe.method != "pgd" or not recipe.random_start:
        return x0
    noise = np.random.default_rng(recipe.seed).uniform(-recipe.eps, recipe.eps, tuple(x0.shape[1:])).astype(np.float32)
    return tf.clip_by_value(x0 + noise, 0.0, 255.0)


def _method_step(recipe: AttackRecipe, gradient: Callable, x0) -> Callable:
    """``advance(x) -> x``: one step of the method, kept in [0, 255] (and, for fgsm and pgd, within eps of x0)."""
    import tensorflow as tf

    if recipe.method == "gd":
        import keras

        variable = tf.Variable(x0)
        optimizer = keras.optimizers.Adam(recipe.learning_rate)

        def adam(_x):
            _, grad = gradient(tf.convert_to_tensor(variable))
            optimizer.apply_gradients([(grad, variable)])
            variable.assign(tf.clip_by_value(variable, 0.0, 255.0))
            return tf.convert_to_tensor(variable)

        return adam
    size = recipe.eps if recipe.method == "fgsm" else recipe.step_size

    def sign(x):
        _, grad = gradient(x)
        x = x - size * tf.sign(grad)
        return tf.clip_by_value(tf.clip_by_value(x, x0 - recipe.eps, x0 + recipe.eps), 0.0, 255.0)

    return sign


def _search(
    clf: Classifier, advance: Callable, x, original: np.ndarray, goal: _Goal, recipe: AttackRecipe, *, progress
) -> tuple[np.ndarray, int, int]:
    """Step until the image rounded to 8 bits fools the model, or the steps run out: (image, its top-1, steps)."""
    rounded, top, taken = original, goal.source, 0
    total = recipe.iterations
    for taken in range(1, total + 1):
        x = advance(x)
        rounded = np.clip(np.rint(x.numpy()[0]), 0, 255).astype(np.uint8)
        top = int(np.argmax(clf.probabilities(rounded[None].astype(np.float32))[0]))
        if progress:
            progress(taken, total)
        if goal.reached(top):
            break
    return rounded, top, taken


def amplified(original: np.ndarray, adversarial: np.ndarray) -> np.ndarray:
    """The change made visible: mid-grey plus the perturbation stretched to the full range."""
    diff = adversarial.astype(np.float32) - original.astype(np.float32)
    scale = 127.0 / max(float(np.abs(diff).max()), 1e-6)
    return np.clip(128 + diff * scale, 0, 255).astype(np.uint8)


def figure_png(result: dict) -> bytes:
    """Original, amplified perturbation and adversarial side by side, with their top-3 labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(top: list[dict]) -> str:
        return "\n".join(f"{t['class']} {t['probability']:.2f}" for t in top[:3])

    fig, axes = plt.subplots(1, 3, figsize=(10, 4.2))
    panels = [
        (result["original"], "original\n" + label(result["before"])),
        (
            amplified(result["original"], result["adversarial"]),
            f"perturbation (amplified)\nL-inf {result['linf']:g}, L2 {result['l2']:g}\nPSNR {result['psnr_db']} dB",
        ),
        (result["adversarial"], "adversarial\n" + label(result["after"])),
    ]
    for ax, (img, title) in zip(axes, panels, strict=True):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return images.figure_png(fig)


def check_output(out: str | Path) -> Path:
    """The adversarial image must be PNG: a lossy format would undo a perturbation of a few levels."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} must end in .png (a lossless format keeps the attack intact)")
    return out


def write_outputs(result: dict, out: str | Path) -> dict[str, str]:
    """Write the adversarial PNG, the amplified perturbation and the figure, each atomically."""
    out = check_output(out)
    paths = {
        "adversarial": out,
        "perturbation": out.with_name(f"{out.stem}-perturbation.png"),
        "figure": out.with_name(f"{out.stem}-figure.png"),
    }
    files.write_bytes(paths["adversarial"], images.png_bytes(result["adversarial"]))
    files.write_bytes(paths["perturbation"], images.png_bytes(amplified(result["original"], result["adversarial"])))
    files.write_bytes(paths["figure"], figure_png(result))
    return {k: str(v) for k, v in paths.items()}
