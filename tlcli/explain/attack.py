"""Adversarial examples in pixel space: gradient descent with an L2 penalty (gd), FGSM and L-inf PGD.

Success is always judged on the image rounded to 8 bits, exactly as it is saved, so a written PNG
still fools the model when it is loaded again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tlcli.data import images
from tlcli.errors import UsageError
from tlcli.models.classifier import Classifier
from tlcli.store import files

METHODS = ("gd", "fgsm", "pgd")


def check_options(method: str, eps: float, step: float | None, steps: int) -> None:
    """Refuse an unknown method or a budget, step or step count that cannot work, before any model is loaded."""
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if not eps > 0:
        raise UsageError(f"--eps must be greater than 0 pixel levels (0-255 scale), not {eps:g}")
    if step is not None and not step > 0:
        raise UsageError(f"--step must be greater than 0 pixel levels, not {step:g}")
    if steps < 1:
        raise UsageError("--steps must be at least 1")


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
    method: str = "pgd",
    eps: float = 2.0,
    step: float | None = None,
    steps: int = 100,
    l2_weight: float = 0.01,
    learning_rate: float = 1.0,
    random_start: bool = False,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Perturb uint8 ``pixels`` until the model predicts ``target`` (or, with target None, any other class).

    ``pgd`` keeps every pixel within ``eps`` levels of the original; ``fgsm`` takes one step of
    ``eps``; ``gd`` (the lesson's method) runs Adam on the pixels against the target's loss plus
    ``l2_weight`` x mean squared change, without a hard budget.
    """
    import tensorflow as tf

    check_options(method, eps, step, steps)
    started = time.perf_counter()
    original = np.asarray(pixels, np.uint8)
    x0 = tf.constant(original[None].astype(np.float32))
    before = clf.top(original.astype(np.float32))
    source = before[0]["index"]
    targeted = target is not None
    goal = tf.constant([target if targeted else source])
    step = step if step is not None else max(eps / 8, 0.25)

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            log_p = tf.gather(clf.log_probs(x)[0], goal[0])
            loss = -log_p if targeted else log_p
            if method == "gd":
                loss += l2_weight * tf.reduce_mean(tf.square(x - x0))
        return loss, tape.gradient(loss, x)

    def fooled(candidate: np.ndarray) -> tuple[bool, int]:
        top = int(np.argmax(clf.probabilities(candidate[None].astype(np.float32))[0]))
        return (top == target if targeted else top != source), top

    rng = np.random.default_rng(seed)
    x = x0
    if method == "pgd" and random_start:
        x = tf.clip_by_value(x0 + rng.uniform(-eps, eps, original.shape).astype(np.float32), 0.0, 255.0)
    optimizer = None
    if method == "gd":
        import keras

        variable = tf.Variable(x0)
        optimizer = keras.optimizers.Adam(learning_rate)
    rounded, success, taken, top = original, False, 0, source
    total = 1 if method == "fgsm" else steps
    for i in range(total):
        taken = i + 1
        if method == "gd":
            _, grad = gradient(tf.convert_to_tensor(variable))
            optimizer.apply_gradients([(grad, variable)])
            variable.assign(tf.clip_by_value(variable, 0.0, 255.0))
            x = tf.convert_to_tensor(variable)
        else:
            _, grad = gradient(x)
            size = eps if method == "fgsm" else step
            x = x - size * tf.sign(grad)
            x = tf.clip_by_value(tf.clip_by_value(x, x0 - eps, x0 + eps), 0.0, 255.0)
        rounded = np.clip(np.rint(x.numpy()[0]), 0, 255).astype(np.uint8)
        success, top = fooled(rounded)
        if progress:
            progress(taken, total)
        if success:
            break
    after = clf.top(rounded.astype(np.float32))
    return {
        "adversarial": rounded,
        "original": original,
        "method": method,
        "targeted": targeted,
        "target": clf.classes[target] if targeted else None,
        "source": clf.classes[source],
        "success": bool(success),
        "predicted": clf.classes[top],
        "before": before,
        "after": after,
        "eps": eps if method != "gd" else None,
        "steps": taken,
        **norms(original, rounded),
        "seconds": round(time.perf_counter() - started, 3),
    }


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
