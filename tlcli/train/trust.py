"""How far to trust a run's outputs on a set of photos: calibration error and the unknown score's rates, as
``evaluate`` reports them."""

from __future__ import annotations

import os

import numpy as np

from tlcli.train import calibrate, plots, unknown


def calibration(meta: dict, probs: np.ndarray, labels: np.ndarray, png: str | os.PathLike, title: str) -> dict:
    """Expected calibration error and log-loss of the saved probabilities and, for a calibrated run, of the same
    model before its temperature (undone from the probabilities); draws both in a reliability diagram."""
    record = meta.get("calibration") or {}
    temperature = record.get("temperature")
    after = calibrate.reliability(probs, labels)
    before = calibrate.reliability(calibrate.rescaled(probs, 1 / temperature), labels) if temperature else None
    plots.reliability_png(after, before, png, title)
    return {
        "ece": after["ece"],
        "ece_before_temperature": before["ece"] if before else None,
        "nll": after["nll"],
        "nll_before_temperature": before["nll"] if before else None,
        "temperature": temperature,
        "bins": after["bins"],
    }


def unknown_rates(meta: dict, known: np.ndarray, unknowns: np.ndarray | None) -> dict:
    """The share of the labelled photos called unknown and, given photos of no known class, the share of those
    called unknown and the AUROC of the score between the two."""
    threshold = meta["unknown"]["threshold"]
    found = {
        "threshold": threshold,
        "n": len(known),
        "flagged": round(float(np.mean(known > threshold)), 4) if len(known) else 0.0,
        "mean_score": round(float(np.mean(known)), 4) if len(known) else None,
    }
    if unknowns is not None and len(unknowns):
        found.update(
            unknowns_n=len(unknowns),
            unknowns_flagged=round(float(np.mean(unknowns > threshold)), 4),
            auroc=round(unknown.auroc(known, unknowns), 4),
        )
    return found
