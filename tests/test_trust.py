"""Trusting a run's outputs: photos of no known class called unknown, calibrated probabilities, and promotion
decided on the same photos for the new run and latest. Real photos from ../shared/data, MobileNet v1 0.25."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlcli.store.features import Store
from tlcli.train import promotion, unknown


def _invoke(runner, *args, code: int = 0) -> dict:
    from tlcli.cli.app import app

    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def _link_photos(src: Path, dest: Path, per_class: slice) -> Path:
    """``dest/<class>/`` holding links to the ``per_class`` slice of each class's sorted photos in ``src``."""
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        (dest / folder.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(folder.iterdir())[per_class]:
            (dest / folder.name / f.name).symlink_to(f)
    return dest


@pytest.fixture(scope="module")
def cats_run(runner, keras_home, shared_data, tmp_path_factory) -> dict:
    """A cats_vs_dogs run (144 px, centre crop), evaluated on its test split with 200 flowers as unknowns."""
    root = tmp_path_factory.mktemp("cats")
    flowers = _link_photos(shared_data / "flowers", root / "flowers", slice(0, 40))
    store, runs = root / "features", root / "runs"
    _invoke(runner, "extract", shared_data / "cats_vs_dogs", "--out", store, "--alpha", "0.25", "--size", "144",
            "--resize", "crop", "--json", "--quiet")  # fmt: skip
    trained = _invoke(runner, "train-head", store, "--out", runs, "--json", "--quiet")
    evaluated = _invoke(runner, "evaluate", runs / "latest", "--unknowns", flowers, "--json", "--quiet")
    return {"root": root, "runs": runs, "flowers": flowers, "trained": trained, "evaluated": evaluated}


def test_photos_of_no_known_class_are_called_unknown(cats_run, record_property):
    """A cats-vs-dogs run meets 200 flower photos: the k-th-neighbour distance separates them from the held-out
    cats and dogs, and the threshold (99th percentile of val's scores) flags most flowers and few pets.

    Measured (split seeds 0-3): AUROC 0.984-0.990, flowers flagged 90-94%, test cats and dogs flagged 0-3%
    (bars 0.95, 80%, 5%).
    """
    u = cats_run["evaluated"]["unknown"]
    record_property(
        "measured",
        f"unknown score, cats_vs_dogs run vs flowers: AUROC {u['auroc']:.4f}, flowers flagged "
        f"{u['unknowns_flagged']:.1%} of {u['unknowns_n']}, test photos flagged {u['flagged']:.1%} of {u['n']}",
    )
    assert u["unknowns_n"] == 200 and u["n"] == cats_run["evaluated"]["n"]
    assert u["auroc"] >= 0.95 and u["unknowns_flagged"] >= 0.80 and u["flagged"] <= 0.05
    run = Path(cats_run["trained"]["run"])
    meta = json.loads((run / "meta.json").read_text())
    assert meta["unknown"]["threshold"] == u["threshold"] == cats_run["trained"]["unknown_threshold"]
    with np.load(run / unknown.FILE, allow_pickle=False) as z:
        bank = z["bank"]
    assert bank.dtype == np.float16 and len(bank) == meta["unknown"]["bank"] <= unknown.BANK_CAP
    assert np.allclose(np.linalg.norm(bank.astype(np.float32), axis=1), 1, atol=1e-2)


def test_predict_says_unknown_and_can_be_told_not_to(cli, cats_run):
    flowers = sorted((cats_run["flowers"] / "daisy").iterdir())[:6]
    result = cli("predict", cats_run["runs"] / "latest", *flowers, "--json", "--quiet")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and len(rows) == 6
    assert sum(r["unknown"] for r in rows) >= 4 and all(r["unknown_score"] > 0 for r in rows)
    off = cli("predict", cats_run["runs"] / "latest", *flowers[:2], "--unknown", "off", "--json", "--quiet")
    assert off.exit_code == 0 and all("unknown" not in json.loads(line) for line in off.stdout.splitlines())
    bad = cli("predict", cats_run["runs"] / "latest", flowers[0], "--unknown", "maybe")
    assert bad.exit_code == 2 and "neither on nor off" in bad.output


@pytest.fixture(scope="module")
def pets_run(runner, keras_home, shared_data, tmp_path_factory) -> dict:
    """An oxford_pets run (37 breeds, 176 px, crop+pad) split 50/20/30, so 304 test photos, evaluated."""
    root = tmp_path_factory.mktemp("pets")
    store, runs = root / "features", root / "runs"
    _invoke(runner, "extract", shared_data / "oxford_pets", "--out", store, "--alpha", "0.25", "--size", "176",
            "--split", "0.5,0.2,0.3", "--json", "--quiet")  # fmt: skip
    trained = _invoke(runner, "train-head", store, "--out", runs, "--json", "--quiet")
    evaluated = _invoke(runner, "evaluate", runs / "latest", "--json", "--quiet")
    return {"store": store, "runs": runs, "trained": trained, "evaluated": evaluated}


def test_temperature_fitted_on_val_calibrates_held_out_pets(pets_run, record_property):
    """The temperature fitted on val before the refit, folded into the saved head, makes the held-out test
    photos' probabilities better calibrated.

    ECE of 304 photos is noisy: a perfectly calibrated model with these confidences scores 0.067 on average
    (0.087 at its 90th percentile, simulated), so the issue's 0.05 cannot be asserted on one split. Measured on
    this split (seeds 0-2): temperature 1.17-1.33, ECE 0.071-0.094 -> 0.059-0.064 (bar 0.08), log-loss lower
    every time. Pooled over 5 folds, every pet held out once (1,001 photos, seeds 0-2): ECE 0.066-0.083 -> 0.028-0.043.
    """
    c = pets_run["evaluated"]["calibration"]
    meta = json.loads((Path(pets_run["trained"]["run"]) / "meta.json").read_text())
    record_property(
        "measured",
        f"oxford_pets test split ({pets_run['evaluated']['n']} photos, accuracy {pets_run['evaluated']['accuracy']}): "
        f"temperature {c['temperature']}, ECE {c['ece_before_temperature']} -> {c['ece']}, "
        f"log-loss {c['nll_before_temperature']} -> {c['nll']}",
    )
    assert c["temperature"] == meta["calibration"]["temperature"] == pets_run["trained"]["temperature"] > 1
    assert c["ece"] <= 0.08 and c["nll"] < c["nll_before_temperature"]
    with Image.open(Path(pets_run["evaluated"]["out"]) / "reliability.png") as png:
        assert png.format == "PNG" and png.size[0] > 200


def test_cross_validated_pets_are_calibrated_within_the_issue_bar(runner, pets_run, record_property):
    """Every pet held out once (5 folds, each fold's temperature fitted on its early-stopping val fold before the
    refit, as train-head does): expected calibration error on all 1,001 photos <= 0.05, and lower than without
    the temperature. Measured (seeds 0-2): ECE 0.066-0.083 -> 0.028-0.043."""
    cv = _invoke(runner, "cross-validate", pets_run["store"], "--folds", "5", "--json", "--quiet")
    c = cv["calibration"]
    record_property(
        "measured",
        f"oxford_pets 5-fold ({cv['n']} photos, accuracy {cv['accuracy']}): temperatures {c['temperatures']}, "
        f"ECE {c['ece_before_temperature']} -> {c['ece']}, log-loss {c['nll_before_temperature']} -> {c['nll']}",
    )
    assert cv["n"] == 1001 and all(t is not None and t > 1 for t in c["temperatures"])
    assert c["ece"] <= 0.05 < c["ece_before_temperature"] and c["nll"] < c["nll_before_temperature"]


CRON = """
[extract]
data_dir = "data/pets"
out = "features/pets"
alpha = 0.25
size = 96
resize = "crop"

[train-head]
out = "runs/pets"
patience = 10
{recipe}

[evaluate]
min_accuracy = 0.0
"""


def test_cron_promotion_compares_both_runs_on_the_same_new_photos(cli, keras_home, shared_data, tmp_path, monkeypatch):
    """The folder grows between two `tlcli run --promote-if-better`; the second run's recipe is crippled (one epoch
    at a tiny learning rate). Both models are scored on the new val photos latest never trained on, and the worse
    new run is not promoted."""
    _link_photos(shared_data / "cats_vs_dogs", tmp_path / "data" / "pets", slice(0, 60))
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "pets.toml"
    config.write_text(CRON.format(recipe=""))
    monkeypatch.chdir(tmp_path)
    first = cli("run", config, "--promote-if-better", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["comparison"] is None, "nothing to compare the first run with"

    _link_photos(shared_data / "cats_vs_dogs", tmp_path / "data" / "pets", slice(60, 120))
    config.write_text(CRON.format(recipe="epochs = 1\nlr = 1e-6"))
    second = cli("run", config, "--promote-if-better", "--json")
    assert second.exit_code == 3, second.output
    doc = json.loads(second.stdout)
    c = doc["comparison"]
    meta = json.loads((Path(doc["run"]) / "meta.json").read_text())
    assert meta["promotion"] == c and not doc["promoted"] and not meta["promoted"]
    latest = (tmp_path / "runs" / "pets" / "latest").resolve()
    assert latest == Path(json.loads(first.stdout)["run"]).resolve() and c["latest_run"] == latest.name
    seen = set(json.loads((latest / promotion.TRAINED_ON).read_text())["photos"])
    val = set(Store.open(tmp_path / "features" / "pets").split("val").paths)
    assert c["compared"] == sorted(val - seen) and c["photos"] == len(val - seen) >= 10
    assert c["latest_accuracy"] > c["new_accuracy"] and not c["better"] and 0 <= c["mcnemar_p"] <= 1
    assert "does not meet gain > 0" in doc["reason"]


def test_mcnemar_and_auroc_against_hand_counts():
    right = np.ones(10, bool)
    assert promotion.mcnemar_p(right, ~right) == pytest.approx(2 / 1024, abs=1e-6)
    assert promotion.mcnemar_p(right, right) == 1.0
    new, old = np.array([1, 1, 1, 0, 1], bool), np.array([1, 0, 0, 1, 1], bool)
    assert promotion.mcnemar_p(new, old) == pytest.approx(1.0)  # b=2, c=1: 2 * (1 + 3) / 8, capped at 1
    assert unknown.auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert unknown.auroc(np.array([0.1, 0.3]), np.array([0.2, 0.3])) == pytest.approx(0.625)
