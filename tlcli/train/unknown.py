"""Out-of-distribution score of a run: distance to the k-th nearest training feature (Sun et al. 2022, "Out-of-
distribution detection with deep nearest neighbors"), on L2-normalised features, with a threshold set on val.

The run folder keeps a capped, class-stratified float16 sample of the training features (``unknown.npz``, read
with ``allow_pickle=False``) and meta.json keeps k and the threshold, so predict and evaluate can say ``unknown``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlcli.errors import UsageError
from tlcli.store import files

FILE = "unknown.npz"
K = 10
PERCENTILE = 99.0
MIN_VAL = 30
BANK_CAP = 2048
"""At most this many training vectors are kept: 1 MB for MobileNet 0.25's 2 x 256 features."""


def normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_distance(queries: np.ndarray, bank: np.ndarray, k: int, *, leave_one_out: bool = False) -> np.ndarray:
    """Euclidean distance from each unit query to its k-th nearest unit vector of ``bank`` (the bank's own rows
    skip themselves with ``leave_one_out``), in blocks of 1024 queries to bound memory."""
    bank = np.asarray(bank, np.float32)
    k = min(k, len(bank) - int(leave_one_out))
    out = np.empty(len(queries), np.float32)
    for start in range(0, len(queries), 1024):
        sims = normalised(queries[start : start + 1024]) @ bank.T
        if leave_one_out:
            sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        out[start : start + len(sims)] = np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
    return out


def _stratified(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices of at most ``cap`` rows, the same share of every class, drawn with ``seed``."""
    if len(labels) <= cap:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[: max(1, round(cap * np.mean(labels == c)))]
        for c in np.unique(labels)
    ]
    return np.sort(np.concatenate(picked))[:cap]


@dataclass(frozen=True)
class Detector:
    """The bank of unit training features, k and the threshold above which an input is ``unknown``."""

    bank: np.ndarray
    k: int
    threshold: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        return knn_distance(features, self.bank, self.k)

    def save(self, run_dir: str | os.PathLike) -> None:
        """Write the bank as float16 into ``run_dir/unknown.npz``, atomically."""
        buf = io.BytesIO()
        np.savez(buf, bank=self.bank.astype(np.float16))
        files.write_bytes(Path(run_dir) / FILE, buf.getvalue())


def bank_indices(labels: np.ndarray, seed: int, cap: int = BANK_CAP) -> np.ndarray:
    """Which training rows go into the bank: all of them up to ``cap``, else a stratified sample."""
    return _stratified(np.asarray(labels), cap, seed)


def fit(bank_features: np.ndarray, val_features: np.ndarray, *, k: int = K, percentile: float = PERCENTILE) -> tuple:
    """A detector on ``bank_features`` (training photos) whose threshold is the ``percentile`` of held-out scores:
    val's, or with under ``MIN_VAL`` val images each bank row's distance to the others. Returns it and its
    meta.json record."""
    bank = normalised(bank_features).astype(np.float16).astype(np.float32)
    k = max(1, min(k, len(bank) - 1))
    held_out = len(val_features) >= MIN_VAL
    scores = knn_distance(val_features, bank, k) if held_out else knn_distance(bank, bank, k, leave_one_out=True)
    threshold = float(np.percentile(scores, percentile))
    record = {
        "score": "distance to the k-th nearest training feature, L2-normalised (Sun et al. 2022)",
        "file": FILE,
        "k": k,
        "bank": len(bank),
        "threshold": round(threshold, 6),
        "percentile": percentile,
        "threshold_on": f"val ({len(scores)} images)" if held_out else f"train, leave-one-out ({len(scores)} images)",
    }
    return Detector(bank, k, threshold), record


def load(run_dir: str | os.PathLike, meta: dict) -> Detector | None:
    """The run's detector, or None for a run saved without one."""
    record = meta.get("unknown")
    if not record:
        return None
    path = Path(run_dir) / record["file"]
    try:
        with np.load(path, allow_pickle=False) as z:
            bank = z["bank"].astype(np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{path} is unreadable ({exc}); retrain, or pass --unknown off") from None
    return Detector(bank, int(record["k"]), float(record["threshold"]))


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of the score separating ``unknown`` (higher) from ``known``: the chance that a
    random unknown input scores above a random known one (ties count half), from ranks (Mann-Whitney U)."""
    both = np.concatenate([known, unknown])
    _, group, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[group]
    u = ranks[len(known) :].sum() - len(unknown) * (len(unknown) + 1) / 2
    return float(u / (len(known) * len(unknown)))
