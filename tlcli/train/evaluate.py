"""Metrics from predicted probabilities: accuracy, top-k, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tlcli.data import datasets
from tlcli.errors import UsageError
from tlcli.models.run import load_run
from tlcli.store import files
from tlcli.train import trust
from tlcli.train.metrics import least_confident, metrics, misclassified
from tlcli.train.plots import confusion_png
from tlcli.train.predict import classifier, expand
from tlcli.train.report import write_report


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
    root = ds.root.resolve()
    return [str(root / f) for f in ds.files], labels, str(root)


def evaluate_run(
    run: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    top_k: int = 5,
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    *,
    unknowns: str | os.PathLike | None = None,
    engine: str = "keras",
) -> dict:
    """Evaluate a saved run on a folder (or its own test split), and its unknown score on ``unknowns``, photos of
    no known class, if given.

    Writes metrics.json, confusion.png, reliability.png, misclassified.json, least_confident.json and report.html
    into ``out`` (default: inside the run, whose report then links it).
    """

    loaded = load_run(run)
    _, meta, run_dir = loaded
    paths, labels, source = labelled_files(meta, data_dir)
    if not paths:
        raise UsageError(f"no images found in {data_dir}")
    if unknowns is not None and not meta.get("unknown"):
        raise UsageError("this run has no unknown score (trained before tlcli kept one); retrain with train-head")
    others = expand([str(unknowns)]) if unknowns is not None else []
    probs, scores, kept, skipped = classifier(loaded, engine=engine)(paths + others, batch_size, progress)
    known = np.asarray(kept, np.int64) < len(paths)
    if not known.any():
        raise UsageError(f"none of the {len(paths)} images could be decoded")
    kept = [i for i in kept if i < len(paths)]
    kept_paths = [paths[i] for i in kept]
    kept_labels = labels[kept]
    probs = probs[known]
    result = metrics(kept_labels, probs, meta["classes"], top_k)
    wrong = misclassified(kept_paths, kept_labels, probs, meta["classes"])
    name = "test" if data_dir is None else Path(data_dir).resolve().name
    dest = Path(out) if out else run_dir / "evaluations" / name
    result.update({"source": source, "run": str(run_dir), "out": str(dest), "misclassified": wrong, "skipped": skipped})
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write evaluation files into {dest}: {exc.strerror}; pass --out DIR") from None
    result["calibration"] = trust.calibration(meta, probs, kept_labels, dest / "reliability.png", source)
    if scores is not None:
        result["unknown"] = trust.unknown_rates(meta, scores[known], scores[~known] if others else None)
    files.write_json(dest / "metrics.json", {k: v for k, v in result.items() if k != "misclassified"})
    files.write_json(dest / "misclassified.json", wrong)
    files.write_json(dest / "least_confident.json", least_confident(kept_paths, kept_labels, probs, meta["classes"]))
    confusion_png(
        result["confusion"], meta["classes"], dest / "confusion.png", f"{source}: accuracy {result['accuracy']:.3f}"
    )
    result["report"] = str(write_report(dest))
    if dest.resolve().parent == run_dir / "evaluations":
        write_report(run_dir)
    return result
