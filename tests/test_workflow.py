"""extract -> train-head -> evaluate -> predict through the CLI, on small images with the offline weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlcli.store.features import Store

from .conftest import COLOUR_EXTRACT as FAST
from .conftest import lock_held, make_photo


def _extract(cli, data, out, *extra):
    result = cli("extract", data, "--out", out, *FAST, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture()
def trained(colour_run):
    """The session's colour photos, store and run (conftest.colour_run): read them, copy what you change."""
    return colour_run


def test_extract_writes_store_with_metadata(trained):
    summary = trained.extracted
    assert summary["stored"] == 24 and summary["extracted"] == 24 and summary["skipped"] == []
    assert summary["splits"] == {"train": 20, "val": 2, "test": 2}
    meta = json.loads((trained.features / "meta.json").read_text())
    assert meta["backbone"] == "mobilenet" and meta["alpha"] == 0.25 and meta["input_size"] == 96
    assert meta["resize"] == "crop+pad" and meta["classes"] == ["blue", "red"]
    assert meta["weights_sha256"].startswith("dbdb03ee2a22")  # the no-top file from ../shared/weights
    assert {"tensorflow", "keras", "tlcli"} <= set(meta["versions"])
    z = Store.open(trained.features).arrays("train")
    assert z["features"].shape == (20, 512) and np.isfinite(z["features"]).all()  # crop and pad views
    assert sorted(set(z["labels"].tolist())) == [0, 1]


def test_extract_is_incremental(cli, keras_home, colour_dataset, tmp_path):
    out = tmp_path / "f"
    _extract(cli, colour_dataset, out)
    z = Store.open(out).arrays("train")
    before = dict(zip(z["paths"].tolist(), z["features"], strict=True))
    again = _extract(cli, colour_dataset, out)
    assert again["extracted"] == 0 and again["reused"] == 24
    make_photo(colour_dataset / "red" / "new1.jpg", (210, 30, 30), seed=77)
    make_photo(colour_dataset / "blue" / "new2.jpg", (30, 30, 210), seed=78)
    (colour_dataset / "red" / "r0.jpg").unlink()
    make_photo(colour_dataset / "red" / "r1.jpg", (250, 250, 0), seed=79)  # changed content, same name
    grown = _extract(cli, colour_dataset, out)
    assert grown["extracted"] == 3 and grown["stored"] == 25
    z = Store.open(out).arrays("train")
    after = dict(zip(z["paths"].tolist(), z["features"], strict=True))
    assert "red/r0.jpg" not in after
    same = [p for p in after if p in before and p != "red/r1.jpg"]
    assert same and all(np.array_equal(after[p], before[p]) for p in same)


def test_a_rerun_runs_the_saved_graph_without_building_the_backbone(
    cli, keras_home, colour_dataset, tmp_path, monkeypatch
):
    from tlcli.models import backbones

    out = tmp_path / "f"
    _extract(cli, colour_dataset, out)
    saved = out / json.loads((out / "meta.json").read_text())["extractor"]["file"]
    make_photo(colour_dataset / "red" / "new1.jpg", (210, 30, 30), seed=77)
    with monkeypatch.context() as m:
        m.setattr(backbones, "build", lambda *a, **k: pytest.fail("the backbone was built again"))
        assert _extract(cli, colour_dataset, out)["extracted"] == 1
    fresh = tmp_path / "g"
    _extract(cli, colour_dataset, fresh)

    def vectors(store):
        found = {}
        for split in ("train", "val", "test"):
            s = Store.open(store).split(split)
            found.update(zip(s.paths, s.features, strict=True))
        return found

    np.testing.assert_allclose(vectors(out)["red/new1.jpg"], vectors(fresh)["red/new1.jpg"], rtol=1e-5, atol=1e-5)
    saved.write_bytes(b"damaged")
    make_photo(colour_dataset / "blue" / "new2.jpg", (30, 30, 210), seed=78)
    assert _extract(cli, colour_dataset, out)["extracted"] == 1
    rebuilt = json.loads((out / "meta.json").read_text())["extractor"]["file"]
    assert (out / rebuilt).read_bytes() != b"damaged"


def test_bad_files_are_skipped_and_listed(cli, keras_home, colour_dataset, tmp_path):
    red = colour_dataset / "red"
    (red / "zero.jpg").write_bytes(b"")
    (red / "text.jpg").write_text("not an image")
    good = (red / "r1.jpg").read_bytes()
    (red / "cut.jpg").write_bytes(good[: len(good) // 3])
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 220, 255
    Image.fromarray(rgba, "RGBA").save(red / "alpha.png")
    Image.new("CMYK", (30, 30), (0, 220, 220, 0)).save(red / "cmyk.jpg")
    Image.fromarray((np.ones((30, 30)) * 40000).astype(np.uint16)).save(colour_dataset / "blue" / "grey16.png")
    make_photo(colour_dataset / "blue" / "anim.gif", (30, 30, 200), fmt="GIF")
    make_photo(colour_dataset / "blue" / "bleu_été.jpg", (30, 30, 200))
    (colour_dataset / "empty_class").mkdir()
    summary = _extract(cli, colour_dataset, tmp_path / "f")
    assert sorted(s["path"] for s in summary["skipped"]) == ["red/cut.jpg", "red/text.jpg", "red/zero.jpg"]
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert reasons["red/zero.jpg"] == "empty file"
    assert summary["stored"] == 24 + 5
    assert summary["empty_classes"] == ["empty_class"]
    plain = cli("extract", colour_dataset, "--out", tmp_path / "f", *FAST)
    assert plain.exit_code == 0 and "skipped 3" in plain.stdout and "red/zero.jpg: empty file" in plain.stderr


def test_train_head_writes_a_complete_run(trained):
    summary, runs = trained.trained, trained.runs
    run = Path(summary["run"])
    assert {p.name for p in run.iterdir()} >= {
        "model.keras",
        "meta.json",
        "history.json",
        "metrics.json",
        "confusion.png",
    }
    assert (runs / "latest").resolve() == run.resolve()
    assert summary["promoted"] and summary["val_accuracy"] == 1.0 and summary["train_accuracy"] == 1.0
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]
    history = json.loads((run / "history.json").read_text())
    assert len(history["loss"]) == summary["epochs_run"] and history["loss"][-1] < history["loss"][0]
    Image.open(run / "confusion.png").verify()


def test_saved_model_takes_one_photo_and_matches_features(trained):
    """model.keras (Keras' own layers) takes a decoded photo at its own size; its views model, fed tlcli's views,
    gives the stored features."""
    import keras

    from tlcli.data import images
    from tlcli.store import features

    summary = trained.trained
    model = keras.saving.load_model(Path(summary["run"]) / "model.keras")
    meta = json.loads((Path(summary["run"]) / "meta.json").read_text())
    test = features.Store.open(trained.features).split("test")
    photos = [images.photo(Path(meta["data_dir"]) / p, 96).astype("float32") for p in test.paths]
    probs = np.concatenate([model.predict(x[None], verbose=0) for x in photos])
    assert probs.shape == (2, 2) and probs.argmax(1).tolist() == test.labels.tolist()
    pixels = np.stack([images.load(Path(meta["data_dir"]) / p, 96, meta["resize"]) for p in test.paths])
    assert pixels.shape == (2, 2, 96, 96, 3)
    views = model.get_layer("views")
    joined = keras.Model(views.inputs, views.get_layer("join_views").output)
    feats = joined.predict([pixels[:, 0].astype("float32"), pixels[:, 1].astype("float32")], verbose=0)
    np.testing.assert_allclose(feats, test.features, rtol=1e-3, atol=1e-3)


def test_evaluate_json_gate_and_files(cli, trained, tmp_path):
    colour_dataset, tmp = trained.data, tmp_path
    latest = trained.copy_runs(tmp / "runs") / "latest"  # evaluate without --out writes into the run
    result = cli("evaluate", latest, colour_dataset, "--json", "--quiet", "--out", tmp / "ev")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["accuracy"] == 1.0 and doc["n"] == 24 and doc["per_class"]["red"]["recall"] == 1.0
    assert doc["misclassified"] == [] and doc["passed"]
    written = {"metrics.json", "confusion.png", "misclassified.json", "least_confident.json", "report.html"}
    assert {p.name for p in (tmp / "ev").iterdir()} == written | {"reliability.png"}
    default = cli("evaluate", latest, "--quiet")
    assert default.exit_code == 0 and "test split" in default.stdout
    flipped = tmp / "flipped"
    shutil.copytree(colour_dataset / "red", flipped / "blue")
    gate = cli("evaluate", latest, flipped, "--min-accuracy", "0.5", "--json", "--quiet")
    assert gate.exit_code == 3
    assert json.loads(gate.stdout)["accuracy"] == 0.0 and "below --min-accuracy" in gate.stderr


def test_predict_table_and_json_lines(cli, trained, tmp_path):
    colour_dataset = trained.data
    (tmp_path / "notes.jpg").write_text("hello")
    result = cli(
        "predict",
        trained.latest,
        colour_dataset / "red" / "r3.jpg",
        colour_dataset / "blue",
        tmp_path / "notes.jpg",
        "--json",
        "--top-k",
        "2",
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 14
    assert lines[0]["top"][0]["class"] == "red" and len(lines[0]["top"]) == 2
    assert all(row["top"][0]["class"] == "blue" for row in lines[1:13])
    assert lines[-1]["path"].endswith("notes.jpg") and "cannot identify" in lines[-1]["error"]
    table = cli("predict", trained.latest, colour_dataset / "red" / "r3.jpg")
    assert table.exit_code == 0 and "red" in table.stdout


def test_promote_if_better_exits_3_and_keeps_latest(cli, trained, tmp_path):
    first, runs = trained.trained, trained.copy_runs(tmp_path / "runs")
    again = cli("train-head", trained.features, "--out", runs, "--promote-if-better", "--json", "--quiet")
    assert again.exit_code == 3
    doc = json.loads(again.stdout)
    assert not doc["promoted"] and Path(doc["run"]).is_dir() and Path(doc["run"]).parent.samefile(runs)
    assert (runs / "latest").resolve() == (runs / Path(first["run"]).name).resolve()


def test_train_head_refuses_other_backbone_or_size(cli, trained, tmp_path):
    tmp = tmp_path
    other = cli("train-head", trained.features, "--out", tmp / "r2", "--backbone", "resnet50", "--quiet")
    assert other.exit_code == 2 and "made by mobilenet, not resnet50" in other.stderr
    size = cli("train-head", trained.features, "--out", tmp / "r2", "--size", "224", "--quiet")
    assert size.exit_code == 2 and "input size 96, not 224" in size.stderr
    assert not (tmp / "r2").exists() or not any((tmp / "r2").iterdir())


def test_model_file_that_is_not_a_model(cli, trained, tmp_path):
    summary, colour_dataset, tmp = trained.trained, trained.data, tmp_path
    fake = tmp / "fake"
    fake.mkdir()
    shutil.copy(Path(summary["run"]) / "meta.json", fake / "meta.json")
    (fake / "model.keras").write_text("definitely not a zip")
    for command in (("evaluate", fake, colour_dataset), ("predict", fake, colour_dataset)):
        result = cli(*command, "--quiet")
        assert result.exit_code == 2
        assert "is not a loadable Keras model" in result.stderr and "Traceback" not in result.output
    missing = cli("evaluate", tmp / "nowhere", "--quiet")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


@pytest.mark.parametrize(
    "setup,message",
    [
        ("missing", "does not exist"),
        ("single", "only one class"),
        ("empty", "no class sub-folders"),
    ],
)
def test_extract_bad_folders_exit_2_and_write_nothing(cli, keras_home, tmp_path, setup, message):
    data = tmp_path / "data"
    if setup == "single":
        make_photo(data / "cat" / "a.jpg", (1, 2, 3))
    elif setup == "empty":
        (data / "cat").mkdir(parents=True)
    result = cli("extract", data, "--out", tmp_path / "f", *FAST)
    assert result.exit_code == 2 and message in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "f").exists()


def test_unknown_backbone_and_bad_alpha(cli, colour_dataset, tmp_path):
    bad = cli("extract", colour_dataset, "--out", tmp_path / "f", "--backbone", "mobilenett")
    assert bad.exit_code == 2 and "did you mean mobilenet" in bad.stderr
    alpha = cli("extract", colour_dataset, "--out", tmp_path / "f", "--alpha", "0.3")
    assert alpha.exit_code == 2 and "no alpha 0.3" in alpha.stderr


def test_weights_not_cached_offline_names_the_file(cli, colour_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    result = cli("extract", colour_dataset, "--out", tmp_path / "f", "--backbone", "vgg16", "--size", "32", "--quiet")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1]
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in errors[0] and "--weights" in errors[0]
    assert result.stdout == ""  # Keras' "Downloading data from ..." goes to stderr, keeping --json output clean
    from tlcli.models.backbones import keras_models_dir

    assert not (keras_models_dir() / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").exists()


def test_weights_file_option(cli, keras_home, colour_dataset, tmp_path):
    weights = keras_home / "models" / "mobilenet_2_5_224_tf_no_top.h5"
    result = cli(
        "extract",
        colour_dataset,
        "--out",
        tmp_path / "f",
        "--alpha",
        "0.25",
        "--size",
        "96",
        "--weights",
        weights,
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["weights"] == str(weights.resolve()) and meta["weights_sha256"].startswith("dbdb03ee2a22")
    wrong = cli("extract", colour_dataset, "--out", tmp_path / "g", "--backbone", "mobilenetv2", "--weights", weights)
    assert wrong.exit_code == 2 and "does not fit mobilenetv2" in wrong.stderr
    os.chmod(tmp_path, 0o755)


def test_a_changed_weights_file_re_extracts_everything(cli, keras_home, colour_dataset, tmp_path):
    """New weights at the same path change the store's key: nothing is reused."""
    import h5py

    weights = tmp_path / "w.h5"
    shutil.copy(keras_home / "models" / "mobilenet_2_5_224_tf_no_top.h5", weights)
    first = _extract(cli, colour_dataset, tmp_path / "f", "--weights", weights)
    assert _extract(cli, colour_dataset, tmp_path / "f", "--weights", weights)["extracted"] == 0
    with h5py.File(weights, "r+") as f:
        kernels = []
        f.visititems(lambda name, obj: kernels.append(obj) if isinstance(obj, h5py.Dataset) and obj.ndim == 4 else None)
        kernels[0][...] = kernels[0][...] * 1.5
    again = _extract(cli, colour_dataset, tmp_path / "f", "--weights", weights)
    assert again["replaced_key"] == first["key"] != again["key"]
    assert again["extracted"] == again["stored"] == first["stored"]


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(cli, keras_home, colour_dataset, tmp_path):
    out = tmp_path / "f"
    out.mkdir()
    with lock_held(out / ".tlcli.lock") as holder:
        busy = cli("extract", colour_dataset, "--out", out, *FAST)
        assert busy.exit_code == 2
        assert f"another tlcli extract is writing {out} (pid {holder.pid}" in busy.stderr and "--wait" in busy.stderr
        assert not (out / "meta.json").exists()
        holder.kill()  # the kernel lets go of a killed holder's lock; its file stays behind
    taken = cli("extract", colour_dataset, "--out", out, *FAST)
    assert taken.exit_code == 0, taken.output
    assert (out / "meta.json").is_file() and not (out / ".tlcli.lock").exists()
    runs = tmp_path / "runs"
    runs.mkdir()
    with lock_held(runs / ".tlcli.lock"):  # a live process holds the runs folder
        refused = cli("train-head", out, "--out", runs, "--quiet")
    assert refused.exit_code == 2 and "another tlcli train-head is writing" in refused.stderr
    assert not (runs / "latest").exists()


def test_cross_validate_holds_out_every_photo_once_and_gates(cli, trained):
    summary, store = trained.extracted, trained.features
    before = sorted(p.name for p in store.iterdir())
    result = cli("cross-validate", store, "--folds", "3", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["n"] == summary["stored"] == 24 and len(doc["per_fold"]) == 3 and doc["folds"] == 3
    assert doc["accuracy"] >= 0.9 and doc["passed"] and doc["source"] == "3-fold cross-validation"
    assert doc["accuracy"] == round(1 - len(doc["misclassified"]) / 24, 4)
    assert sorted(p.name for p in store.iterdir()) == before  # writes nothing
    again = json.loads(cli("cross-validate", store, "--folds", "3", "--json", "--quiet").stdout)
    assert again["per_fold"] == doc["per_fold"]

    gated = cli("cross-validate", store, "--folds", "3", "--min-accuracy", "1.0", "--lr", "0", "--quiet")
    assert gated.exit_code == 3 and "below --min-accuracy 1.0" in gated.stderr
    for bad, message in (
        (("--folds", "2"), "greater than or equal to 3"),
        (("--folds", "25"), "fewer than --folds 25"),
    ):
        refused = cli("cross-validate", store, *bad, "--quiet")
        assert refused.exit_code == 2 and message in refused.stderr and "Traceback" not in refused.output
