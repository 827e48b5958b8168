"""Metrics from predicted probabilities: accuracy, top-k, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tlcli.data import datasets, images
from tlcli.errors import UsageError
from tlcli.store import runs


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
        f"top_{kk}_accuracy": round(top_k_acc, 4),
        "macro_f1": round(float(np.mean([c["f1"] for c in present])) if present else 0.0, 4),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": list(classes),
    }


def confusion_png(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike, title: str = ""
) -> None:
    """Draw the confusion matrix (rows true, columns predicted) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    k = len(classes)
    side = min(4 + 0.35 * k, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=90 if k > 6 else 0, fontsize=8 if k > 10 else 10)
    ax.set_yticks(range(k), classes, fontsize=8 if k > 10 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if k <= 20:
        top = cm.max() if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    color="white" if cm[i, j] > top / 2 else "black",
                    fontsize=8,
                )
    fig.tight_layout()
    runs.write_bytes(path, images.figure_png(fig))


def curves_png(history: dict[str, list[float]], path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy per epoch (train, val, refit) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, values in history.items():
        if not values or not isinstance(values, list):
            continue
        ax = acc_ax if "accuracy" in key else loss_ax
        epochs = range(1, len(values) + 1)
        ax.plot(epochs, values, label=key.replace("_", " "))
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    runs.write_bytes(path, images.figure_png(fig))


def labelled_files(run_meta: dict, data_dir: str | os.PathLike | None) -> tuple[list[str], np.ndarray, str]:
    """The images to evaluate on, with labels in the model's class order: a folder, or the run's test split."""
    classes = run_meta["classes"]
    if data_dir is None:
        root = Path(run_meta["data_dir"])
        test = run_meta.get("test_files", [])
        if not test:
            raise UsageError("this run has no stored test split; pass a DATA_DIR of class sub-folders to evaluate on")
        missing = [rel for rel, _ in test if not (root / rel).exists()]
        if len(missing) == len(test):
            raise UsageError(f"the run's test images under {root} are gone; pass a DATA_DIR of class sub-folders")
        pairs = [(rel, lab) for rel, lab in test if (root / rel).exists()]
        return [str(root / rel) for rel, _ in pairs], np.asarray([lab for _, lab in pairs], np.int64), "test split"
    ds = datasets.scan(data_dir, min_classes=1)
    unknown = [c for c in ds.classes if c not in classes]
    if unknown:
        raise UsageError(
            f"class folder(s) {', '.join(unknown)} in {data_dir} are not classes of this model "
            f"({', '.join(classes[:10])}"
            f"{', ...' if len(classes) > 10 else ''}); rename or remove them"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index[ds.classes[lab]] for lab in ds.labels], np.int64)
    return [str(ds.root / f) for f in ds.files], labels, str(ds.root)


def misclassified(paths: Sequence[str], labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """Every wrongly classified file with its true and predicted class, most confident mistakes first."""
    pred = probs.argmax(1)
    wrong = [i for i in range(len(labels)) if pred[i] != labels[i]]
    wrong.sort(key=lambda i: -float(probs[i, pred[i]]))
    return [
        {
            "path": paths[i],
            "true": classes[labels[i]],
            "predicted": classes[pred[i]],
            "confidence": round(float(probs[i, pred[i]]), 4),
        }
        for i in wrong
    ]


def evaluate_run(
    run: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    top_k: int = 5,
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Evaluate a saved run on a folder (or its own test split).

    Writes metrics.json, confusion.png and misclassified.json into ``out`` (default: inside the run).
    """
    from tlcli.train.head import load_run

    model, meta, run_dir = load_run(run)
    paths, labels, source = labelled_files(meta, data_dir)
    if not paths:
        raise UsageError(f"no images found in {data_dir}")
    probs, kept, skipped = images.apply_model(model, paths, meta["input_size"], meta["resize"], batch_size, progress)
    if not kept:
        raise UsageError(f"none of the {len(paths)} images could be decoded")
    kept_paths = [paths[i] for i in kept]
    kept_labels = labels[kept]
    result = metrics(kept_labels, probs, meta["classes"], top_k)
    wrong = misclassified(kept_paths, kept_labels, probs, meta["classes"])
    name = "test" if data_dir is None else Path(data_dir).resolve().name
    dest = Path(out) if out else run_dir / "evaluations" / name
    result.update({"source": source, "run": str(run_dir), "out": str(dest), "misclassified": wrong, "skipped": skipped})
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write evaluation files into {dest}: {exc.strerror}; pass --out DIR") from None
    runs.write_json(dest / "metrics.json", {k: v for k, v in result.items() if k != "misclassified"})
    runs.write_json(dest / "misclassified.json", wrong)
    confusion_png(
        result["confusion"], meta["classes"], dest / "confusion.png", f"{source}: accuracy {result['accuracy']:.3f}"
    )
    return result
