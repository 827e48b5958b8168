"""Classification metrics from labels and probabilities: accuracy, top-k, per-class scores, confusion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEAST_CONFIDENT = 20


def metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], top_k: int = 5) -> dict:
    """Accuracy, top-k accuracy, per-class precision/recall/F1/support and the confusion matrix."""
    labels = np.asarray(labels, np.int64)
    n, k = len(labels), len(classes)
    pred = probs.argmax(1) if n else np.zeros(0, np.int64)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = int(confusion[i, i])
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": actual,
        }
    kk = min(top_k, k)
    topk = np.argsort(-probs, axis=1)[:, :kk] if n else np.zeros((0, kk), np.int64)
    top_k_acc = float((topk == labels[:, None]).any(1).mean()) if n else 0.0
    present = [c for c in per_class.values() if c["support"]]
    return {
        "accuracy": round(float((pred == labels).mean()) if n else 0.0, 4),
        "n": n,
        "top_k": kk,
        "top_k_accuracy": round(top_k_acc, 4),
        "macro_f1": round(float(np.mean([c["f1"] for c in present])) if present else 0.0, 4),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": list(classes),
    }


def _records(
    rows: list[int], paths: Sequence[str], labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> list[dict]:
    """One record per row: path, true and predicted class, and the predicted class's probability."""
    pred = probs.argmax(1)
    return [
        {
            "path": paths[i],
            "true": classes[labels[i]],
            "predicted": classes[pred[i]],
            "confidence": round(float(probs[i, pred[i]]), 4),
        }
        for i in rows
    ]


def misclassified(paths: Sequence[str], labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """Every wrongly classified file with its true and predicted class, most confident mistakes first."""
    pred = probs.argmax(1)
    wrong = [i for i in range(len(labels)) if pred[i] != labels[i]]
    wrong.sort(key=lambda i: -float(probs[i, pred[i]]))
    return _records(wrong, paths, labels, probs, classes)


def least_confident(
    paths: Sequence[str], labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], count: int = LEAST_CONFIDENT
) -> list[dict]:
    """The ``count`` correctly classified files the model was least sure of, least confident first: the photos
    to look at next to the mistakes (a report shows them when there are few mistakes)."""
    pred = probs.argmax(1)
    right = [i for i in range(len(labels)) if pred[i] == labels[i]]
    right.sort(key=lambda i: float(probs[i, pred[i]]))
    return _records(right[:count], paths, labels, probs, classes)
