"""Calibrated probabilities: temperature scaling (Guo et al. 2017) fitted on val, and expected calibration error.

One temperature T divides the logits, so ``softmax(log p / T)`` rescales any softmax output; it never changes
which class is on top. The run folds T into its head (``portable.fold_temperature``), so model.keras gives the
calibrated probabilities itself.
"""

from __future__ import annotations

import numpy as np

MIN_IMAGES = 30
"""Fewer val images than this leave a run uncalibrated: one temperature from a handful of photos is noise."""
BINS = 15
"""Equal-width confidence bins of the expected calibration error, as Guo et al. count it."""


def rescaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / temperature)``: the probabilities of logits divided by ``temperature``."""
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-30, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def _nll(probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-np.mean(np.log(np.clip(rescaled(probs, temperature)[np.arange(len(labels)), labels], 1e-30, 1))))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises the negative log-likelihood of ``labels`` (golden-section
    search on log T, where the likelihood is unimodal)."""
    labels = np.asarray(labels, np.int64)
    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _nll(probs, labels, np.exp(a)) < _nll(probs, labels, np.exp(b)):
            hi = b
        else:
            lo = a
    return round(float(np.exp((lo + hi) / 2)), 4)


def fitted_or_none(probs: np.ndarray | None, labels: np.ndarray) -> float | None:
    """The val temperature, or None where one would be noise (under MIN_IMAGES photos) or would only sharpen
    (no mistakes on val)."""
    if probs is None or len(labels) < MIN_IMAGES or np.all(probs.argmax(axis=1) == labels):
        return None
    return fit_temperature(probs, labels)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
    """Expected calibration error (the images-weighted mean gap between confidence and accuracy over equal-width
    confidence bins), the negative log-likelihood, and each bin's count, mean confidence and accuracy, for a
    reliability diagram."""
    probs, labels = np.asarray(probs), np.asarray(labels, np.int64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_conf = np.bincount(which, confidence, bins) / np.maximum(count, 1)
    accuracy = np.bincount(which, correct.astype(float), bins) / np.maximum(count, 1)
    ece = float(np.sum(count * np.abs(mean_conf - accuracy)) / max(len(labels), 1))
    return {
        "ece": round(ece, 4),
        "nll": round(_nll(probs, labels, 1.0), 4),
        "bins": bins,
        "count": count.tolist(),
        "confidence": np.round(mean_conf, 4).tolist(),
        "accuracy": np.round(accuracy, 4).tolist(),
    }
