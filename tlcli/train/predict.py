"""Classify image files and folders with a saved run."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from tlcli.data.images import is_image_name
from tlcli.errors import UsageError
from tlcli.models.graph import scorer
from tlcli.models.portable import takes_image, with_features
from tlcli.models.run import load_run
from tlcli.train import unknown


def expand(paths: Sequence[str]) -> list[str]:
    """Files as given, folders searched recursively for images, in sorted order; missing paths are an error."""
    found: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_name(f)]
        elif os.path.exists(p):
            found.append(p)
        else:
            raise UsageError(f"{p} does not exist")
    return found


def classifier(loaded: tuple, *, unknown_score: bool = True, engine: str = "keras") -> Callable[..., tuple]:
    """A run's model (``load_run``'s model, meta and folder), traced once (on ``engine``), as a function of
    (files, batch_size, progress) -> probabilities and unknown scores of the readable files, their indices and the
    files skipped. Scores are None with ``unknown_score`` off or for a run saved without them."""
    model, meta, run_dir = loaded
    detector = unknown.load(run_dir, meta) if unknown_score and takes_image(model) else None
    scored = with_features(model) if detector is not None else model
    score = scorer(scored, meta["input_size"], meta["resize"], engine=engine)
    n = len(meta["classes"])

    def classify(files: Sequence[str], batch_size: int = 32, progress: Callable[[int, int], None] | None = None):
        outputs, kept, skipped = score(files, batch_size, progress)
        scores = detector.scores(outputs[:, n:]) if detector is not None else None
        return outputs[:, :n], scores, kept, skipped

    return classify


def _row(path: str, probs: np.ndarray, score: float | None, meta: dict, k: int) -> dict:
    """One photo's line: its top-k classes, and its unknown score and verdict when the run has them."""
    classes = meta["classes"]
    order = np.argsort(-probs)[:k]
    row = {"path": path, "top": [{"class": classes[j], "probability": round(float(probs[j]), 4)} for j in order]}
    if score is not None:
        row.update(unknown_score=round(float(score), 4), unknown=bool(score > meta["unknown"]["threshold"]))
    return row


def predict_batches(
    run: str | os.PathLike,
    paths: Sequence[str],
    top_k: int = 3,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    *,
    unknown_score: bool = True,
    engine: str = "keras",
) -> Iterator[tuple[list[dict], list[dict]]]:
    """Top-k classes with probabilities for each readable image (with its unknown score and whether it is above
    the run's threshold), and the files that could not be read, one batch of files at a time, so a caller can
    print each batch's results as soon as it is scored."""

    loaded = load_run(run)
    meta = loaded[1]
    files = expand(paths)
    if not files:
        raise UsageError(f"no images found in {', '.join(map(str, paths))}")
    classify = classifier(loaded, unknown_score=unknown_score, engine=engine)
    k = min(top_k, len(meta["classes"]))
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        probs, scores, kept, skipped = classify(batch, batch_size)
        rows = [
            _row(str(Path(batch[i])), probs[r], None if scores is None else scores[r], meta, k)
            for r, i in enumerate(kept)
        ]
        if progress:
            progress(start + len(batch), len(files))
        yield rows, skipped


def predict_paths(
    run: str | os.PathLike,
    paths: Sequence[str],
    top_k: int = 3,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    *,
    unknown_score: bool = True,
    engine: str = "keras",
) -> tuple[list[dict], list[dict]]:
    """Top-k classes with probabilities for each readable image (and its unknown score), and the files that could
    not be read."""
    rows: list[dict] = []
    skipped: list[dict] = []
    batches = predict_batches(run, paths, top_k, batch_size, progress, unknown_score=unknown_score, engine=engine)
    for batch_rows, batch_skipped in batches:
        rows += batch_rows
        skipped += batch_skipped
    return rows, skipped
