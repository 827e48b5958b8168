"""Classify image files and folders with a saved run."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from tlcli.data.images import is_image_name
from tlcli.errors import UsageError
from tlcli.models.graph import scorer
from tlcli.models.run import load_run


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


def predict_batches(
    run: str | os.PathLike,
    paths: Sequence[str],
    top_k: int = 3,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[list[dict], list[dict]]]:
    """Top-k classes with probabilities for each readable image, and the files that could not be read, one
    batch of files at a time, so a caller can print each batch's results as soon as it is scored."""

    model, meta, _ = load_run(run)
    files = expand(paths)
    if not files:
        raise UsageError(f"no images found in {', '.join(map(str, paths))}")
    score = scorer(model, meta["input_size"], meta["resize"])
    classes = meta["classes"]
    k = min(top_k, len(classes))
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        probs, kept, skipped = score(batch, batch_size)
        rows = []
        for row, i in zip(probs, kept, strict=True):
            order = np.argsort(-row)[:k]
            rows.append(
                {
                    "path": str(Path(batch[i])),
                    "top": [{"class": classes[j], "probability": round(float(row[j]), 4)} for j in order],
                }
            )
        if progress:
            progress(start + len(batch), len(files))
        yield rows, skipped


def predict_paths(
    run: str | os.PathLike,
    paths: Sequence[str],
    top_k: int = 3,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Top-k classes with probabilities for each readable image, and the files that could not be read."""
    rows: list[dict] = []
    skipped: list[dict] = []
    for batch_rows, batch_skipped in predict_batches(run, paths, top_k, batch_size, progress):
        rows += batch_rows
        skipped += batch_skipped
    return rows, skipped
