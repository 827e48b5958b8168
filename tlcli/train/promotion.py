"""Fair promotion: the new run and the current ``latest`` scored on the same photos, with a paired test.

The photos are the new store's val split, less any photo ``latest`` trained on (its ``trained_on.json``; a refit
trains on val too): the new run is represented by its model before any refit saw val, ``latest`` by its saved
model fed the photo files. McNemar's exact test on the photos where exactly one of them is right gives the
p-value of "they are equally accurate".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlcli.errors import UsageError
from tlcli.models.graph import apply_model
from tlcli.models.run import load_run
from tlcli.store import files

TRAINED_ON = "trained_on.json"


@dataclass(frozen=True)
class Rule:
    """Promote when the new run's accuracy beats latest's by more than ``min_gain`` on the shared photos and
    McNemar's p-value is at most ``max_p``."""

    min_gain: float = 0.0
    max_p: float = 1.0


def mcnemar_p(new_right: np.ndarray, old_right: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: a binomial(b + c, 1/2) test on the b photos only the new model gets right
    and the c only the old one does."""
    b = int(np.sum(new_right & ~old_right))
    c = int(np.sum(old_right & ~new_right))
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return round(min(1.0, 2 * tail), 6)


def trained_on(run_dir: Path) -> set[str] | None:
    """The photos (paths under the data folder) a run's model trained on, or None for a run that did not record
    them."""
    path = run_dir / TRAINED_ON
    return set(files.read_json(path)["photos"]) if path.is_file() else None


def _latest_right(run_dir: Path, data_dir: Path, paths: Sequence[str], truth: Sequence[str]) -> tuple:
    """Which of the photos latest's saved model classifies right (by class name), and the indices it could read."""
    model, meta, _ = load_run(run_dir)
    probs, kept, _ = apply_model(model, [str(data_dir / p) for p in paths], meta["input_size"], meta["resize"])
    names = np.asarray(meta["classes"])[probs.argmax(axis=1)] if len(kept) else np.zeros(0, str)
    return names == np.asarray(truth)[kept], kept


def compare(runs_root: Path, held_out, classes: Sequence[str], data_dir: str, rule: Rule = Rule()) -> dict | None:
    """The comparison with ``latest`` on the photos neither trained on (None without a latest): both
    accuracies, the photos (count and paths), the gain, McNemar's p-value and whether the new run is better under
    ``rule``.

    ``held_out`` holds the new run's val predictions (``probs``, ``labels``, ``paths``) made before any refit.
    """
    link = runs_root / "latest"
    if not link.exists():
        return None
    latest = link.resolve()
    seen = trained_on(latest)
    keep = [i for i, p in enumerate(held_out.paths) if seen is None or p not in seen]
    truth = [classes[held_out.labels[i]] for i in keep]
    try:
        old_right, kept = _latest_right(latest, Path(data_dir), [held_out.paths[i] for i in keep], truth)
    except UsageError as exc:
        raise UsageError(f"cannot score latest ({latest.name}) for --promote-if-better: {exc}") from None
    rows = np.asarray(keep, np.int64)[kept]
    new_right = held_out.probs[rows].argmax(axis=1) == held_out.labels[rows]
    n = len(rows)
    new_acc, old_acc = (float(np.mean(r)) if n else 0.0 for r in (new_right, old_right))
    p = mcnemar_p(new_right, old_right)
    return {
        "on": "val photos latest did not train on" if seen is not None else "val photos (latest recorded none)",
        "photos": n,
        "latest_run": latest.name,
        "new_accuracy": round(new_acc, 4),
        "latest_accuracy": round(old_acc, 4),
        "gain": round(new_acc - old_acc, 4),
        "mcnemar_p": p,
        "min_gain": rule.min_gain,
        "max_p": rule.max_p,
        "better": bool(n and new_acc - old_acc > rule.min_gain and p <= rule.max_p),
        "compared": sorted(held_out.paths[i] for i in rows),
    }
