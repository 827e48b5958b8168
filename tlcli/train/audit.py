"""Audit a feature store without changing it: likely label errors (confident learning on out-of-fold
probabilities), near-duplicates (feature cosine, content hash) flagged when they cross splits, and outliers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tlcli.store import files
from tlcli.store.features import SPLITS, Store
from tlcli.train import crossval, sheets
from tlcli.train.recipes import DUPLICATE_SIMILARITY, HEAD, HeadRecipe

AUDIT_DIR = "audit"
NEIGHBOURS = 10
OUTLIER_SPREAD = 3.5
"""An outlier's distance to its nearest class exceeds the median by this many robust standard deviations: on
cats_vs_dogs (MobileNet 0.25, 224 px) a bike, a banana and a goldfish score 5.3, 6.9 and 3.8, and 8 of the
1,022 pets over 3.5 (a Santa card, cats and dogs behind wire)."""
BLOCK_ENTRIES = 1 << 22
"""Similarities computed at once: a block of rows against every photo, about 32 MB a matrix."""


def label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[list[int], np.ndarray, int]:
    """Photos whose given label is not the held-out head's best guess, or that confident learning (Northcutt
    et al. 2021) puts off the confident joint's diagonal, ranked by the probability of their given label.

    A photo is confidently of class j when p_j reaches class j's threshold, the mean p_j of the photos
    labelled j (the most probable such j wins). Returns the ranked rows, the confident flags of all rows
    and the number of label errors the calibrated confident joint estimates.
    """
    n, k = probs.shape
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])
    above = probs >= thresholds
    confident_class = np.where(above, probs, -1.0).argmax(1)
    counted = above.any(1)
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[counted], confident_class[counted]), 1)
    given = np.bincount(labels, minlength=k)
    calibrated = joint / np.maximum(joint.sum(1, keepdims=True), 1) * given[:, None]
    estimate = int(round(calibrated.sum() - np.trace(calibrated)))
    confident = counted & (confident_class != labels)
    self_confidence = probs[np.arange(n), labels]
    suspect = confident | (probs.argmax(1) != labels)
    ranked = [int(i) for i in np.argsort(self_confidence, kind="stable") if suspect[i]]
    return ranked, confident, estimate


class Neighbours(NamedTuple):
    """Pairs of photos at least ``similarity`` alike (rows i < j and the cosine of their vectors less the
    store's mean vector) and each photo's distance to its nearest class (1 - mean cosine of the vectors
    to its NEIGHBOURS closest photos of that class)."""

    pairs: list[tuple[int, int, float]]
    distance: np.ndarray


def neighbours(vectors: np.ndarray, labels: np.ndarray, similarity: float) -> Neighbours:
    """Both from one product of the vectors, a block of rows at a time (memory grows with n, not n squared).

    Centring spreads different photos apart (on cats_vs_dogs the most alike pair of different photos scores
    0.80 centred, 0.92 not) while re-encoded copies stay near 1; outliers show best uncentred, as a photo
    unlike the rest lies far from all of them rather than from their mean.
    """
    x = vectors.astype(np.float64)
    mean = x.mean(0)
    norms = np.maximum(np.linalg.norm(x, axis=1), 1e-12)
    to_mean = x @ mean
    centred_norms = np.sqrt(np.maximum(norms**2 - 2 * to_mean + mean @ mean, 1e-24))
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    pairs: list[tuple[int, int, float]] = []
    distance = np.full(len(x), np.inf)
    block = max(1, BLOCK_ENTRIES // len(x))
    for start in range(0, len(x), block):
        rows = np.arange(start, min(start + block, len(x)))
        dots = x[rows] @ x.T
        centred = (dots - to_mean[rows, None] - to_mean[None, :] + mean @ mean) / np.outer(
            centred_norms[rows], centred_norms
        )
        for r, c in zip(*np.nonzero(centred >= similarity), strict=True):
            if c > rows[r]:
                pairs.append((int(rows[r]), int(c), float(centred[r, c])))
        cosine = dots / np.outer(norms[rows], norms)
        cosine[np.arange(len(rows)), rows] = -np.inf
        for cls in members:
            k = min(NEIGHBOURS, len(cls) - 1)
            if k >= 1:
                nearest = -np.partition(-cosine[:, cls], k - 1, axis=1)[:, :k]
                distance[rows] = np.minimum(distance[rows], 1 - nearest.mean(1))
    return Neighbours(pairs, distance)


def duplicates(found: Neighbours, hashes: np.ndarray, splits: np.ndarray) -> list[tuple[int, int, float, bool]]:
    """Near-duplicate pairs plus every pair of identical files (same content hash), as (i, j, cosine,
    identical); pairs that sit in different splits come first, then the most alike."""
    alike = {(i, j): s for i, j, s in found.pairs}
    by_hash: dict[str, list[int]] = {}
    for row, digest in enumerate(hashes):
        by_hash.setdefault(str(digest), []).append(row)
    for group in by_hash.values():
        for a, i in enumerate(group):
            for j in group[a + 1 :]:
                alike.setdefault((i, j), 1.0)
    listed = [(i, j, s, hashes[i] == hashes[j]) for (i, j), s in alike.items()]
    return sorted(listed, key=lambda p: (splits[p[0]] == splits[p[1]], -p[2], p[0], p[1]))


def outliers(distance: np.ndarray) -> list[int]:
    """Rows whose distance to their nearest class lies over OUTLIER_SPREAD robust standard deviations (1.4826
    median absolute deviations) above the median, farthest first."""
    finite = distance[np.isfinite(distance)]
    if not len(finite):
        return []
    median = np.median(finite)
    spread = 1.4826 * np.median(np.abs(finite - median))
    fence = median + OUTLIER_SPREAD * max(spread, 1e-6)
    return [int(i) for i in np.argsort(-distance, kind="stable") if np.isfinite(distance[i]) and distance[i] > fence]


class Photos(NamedTuple):
    """The store's photos in ``Split.joined`` order: path, split and content hash of each."""

    paths: list[str]
    splits: np.ndarray
    hashes: np.ndarray


def _photos(store: Store) -> Photos:
    parts = [store.arrays(s) for s in SPLITS]
    return Photos(
        [str(p) for a in parts for p in a["paths"]],
        np.concatenate([np.full(len(a["paths"]), s) for s, a in zip(SPLITS, parts, strict=True)]),
        np.concatenate([a["hashes"] for a in parts]).astype(str),
    )


def _report(store: Store, photos: Photos, held: crossval.HeldOut, similarity: float) -> dict:
    """The audit's findings as audit.json holds them."""
    classes = store.meta["classes"]
    labels, probs = held.every.labels, held.probs
    ranked, confident, estimate = label_issues(labels, probs)
    found = neighbours(held.every.features, labels, similarity)
    pairs = duplicates(found, photos.hashes, photos.splits)
    predicted = probs.argmax(1)

    def photo(i: int) -> dict:
        return {"path": photos.paths[i], "split": str(photos.splits[i]), "label": classes[labels[i]]}

    return {
        "accuracy": round(float((predicted == labels).mean()), 4),
        "estimated_label_errors": estimate,
        "label_issues": [
            photo(i)
            | {
                "predicted": classes[predicted[i]],
                "p_label": round(float(probs[i, labels[i]]), 4),
                "p_predicted": round(float(probs[i, predicted[i]]), 4),
                "confident": bool(confident[i]),
            }
            for i in ranked
        ],
        "cross_split_duplicates": sum(photos.splits[i] != photos.splits[j] for i, j, _, _ in pairs),
        "duplicates": [
            {
                "a": photo(i),
                "b": photo(j),
                "similarity": round(s, 4),
                "identical": bool(same),
                "cross_split": bool(photos.splits[i] != photos.splits[j]),
            }
            for i, j, s, same in pairs
        ],
        "outliers": [photo(i) | {"distance": round(float(found.distance[i]), 4)} for i in outliers(found.distance)],
    }


def _sheet_tiles(report: dict, data_dir: Path, top: int) -> list[sheets.Tile]:
    """The top label suspects, then cross-split duplicate pairs side by side, then outliers."""
    tiles = [
        sheets.Tile(
            data_dir / s["path"],
            (f"given {s['label']} -> {s['predicted']}", f"p(given) {s['p_label']:.2f}", s["path"]),
            (200, 0, 0) if s["confident"] else (160, 90, 0),
        )
        for s in report["label_issues"][:top]
    ]
    for pair in [d for d in report["duplicates"] if d["cross_split"]][: max(1, top // 4)]:
        how = "identical" if pair["identical"] else f"cos {pair['similarity']:.3f}"
        for side in (pair["a"], pair["b"]):
            tiles.append(sheets.Tile(data_dir / side["path"], (f"duplicate in {side['split']}", how, side["path"])))
    for o in report["outliers"][: max(1, top // 4)]:
        tiles.append(
            sheets.Tile(data_dir / o["path"], (f"outlier ({o['label']})", f"distance {o['distance']:.3f}", o["path"]))
        )
    return tiles


def audit(
    features_dir: str | os.PathLike,
    recipe: HeadRecipe = HEAD,
    *,
    folds: int = 5,
    out: str | os.PathLike | None = None,
    similarity: float = DUPLICATE_SIMILARITY,
    top: int = 24,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Audit the store's photos and write ``audit.json`` and the contact sheet ``audit.png`` of the ``top``
    suspects into ``out`` (default FEATURES/audit). Changes neither the store nor the photos."""
    started = time.perf_counter()
    store = Store.open(features_dir)
    out = Path(out) if out is not None else Path(features_dir) / AUDIT_DIR
    held = crossval.out_of_fold(store, recipe, folds=folds, progress=progress)
    report = {
        "features": str(features_dir),
        "features_key": store.meta["key"],
        "data_dir": store.meta.get("data_dir"),
        "n": len(held.every.labels),
        "folds": folds,
        "seed": recipe.seed,
        "similarity": similarity,
        **_report(store, _photos(store), held, similarity),
        "json": str(out / "audit.json"),
        "sheet": str(out / "audit.png"),
    }
    tiles = _sheet_tiles(report, Path(store.meta.get("data_dir") or "."), top)
    if tiles:
        sheets.contact_sheet(tiles, out / "audit.png")
    else:
        report["sheet"] = None
    report["seconds"] = round(time.perf_counter() - started, 3)
    files.write_json(out / "audit.json", report)
    return report
