"""export: a SavedModel serving JPEG bytes and TFLite files with their labels, checked against tlcli predict;
runs saved before models were portable (tlcli's own layers, views in) still load everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture()
def run_dir(colour_run) -> Path:
    """The session's trained colour run (conftest.colour_run); the tests only read it."""
    return colour_run.latest


def _data(run_dir) -> Path:
    return Path(json.loads((run_dir / "meta.json").read_text())["data_dir"])


def _predicted(cli, run, *paths) -> list[str]:
    res = cli("predict", run, *paths, "--json", "--quiet")
    assert res.exit_code == 0, res.output
    return [json.loads(line)["top"][0]["class"] for line in res.stdout.splitlines()]


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_tflite_holds_its_labels_and_agrees_with_predict(cli, run_dir, tmp_path, quantize):
    import tensorflow as tf

    out = tmp_path / f"{quantize}.tflite"
    res = cli("export", run_dir, "--out", out, "--quantize", quantize, "--json", "--quiet")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["top1_agreement"] >= (0.97 if quantize == "int8" else 0.995) and doc["checked_images"] == 24
    assert out.read_bytes()[4:8] == b"TFL3"
    assert zipfile.ZipFile(out).read("labels.txt").decode().split() == ["blue", "red"]
    assert out.with_suffix(".labels.txt").read_text().split() == ["blue", "red"]
    photo = _data(run_dir) / "red" / "r0.jpg"
    pixels = tf.io.decode_jpeg(photo.read_bytes(), channels=3).numpy()[None].astype(np.float32)
    interpreter = tf.lite.Interpreter(model_path=str(out))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], pixels.shape)  # the photo at its own size: 48 x 40
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], pixels)
    interpreter.invoke()
    probs = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
    assert ["blue", "red"][probs.argmax()] == _predicted(cli, run_dir, photo)[0] == "red"


def test_onnx_holds_its_labels_and_agrees_with_predict(cli, run_dir, tmp_path):
    pytest.importorskip("tf2onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    res = cli("export", run_dir, "--out", out, "--format", "onnx", "--json", "--quiet")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["top1_agreement"] >= 0.995
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["labels"].split() == ["blue", "red"]
    photo = _data(run_dir) / "blue" / "b0.jpg"
    import tensorflow as tf

    pixels = tf.io.decode_jpeg(photo.read_bytes(), channels=3).numpy()[None].astype(np.float32)
    probs = session.run(None, {session.get_inputs()[0].name: pixels})[0][0]
    assert ["blue", "red"][probs.argmax()] == _predicted(cli, run_dir, photo)[0] == "blue"


def _saved_model_cli(model_dir, signature: str, key: str, value: np.ndarray, tmp_path) -> str:
    np.save(tmp_path / "input.npy", value, allow_pickle=True)
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    done = subprocess.run(
        [*cli, "run", "--dir", str(model_dir), "--tag_set", "serve", "--signature_def", signature,
         "--inputs", f"{key}={tmp_path / 'input.npy'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_savedmodel_serves_jpeg_bytes_and_pixels(cli, run_dir, tmp_path):
    res = cli("export", run_dir, "--out", tmp_path / "sm", "--format", "savedmodel", "--json", "--quiet")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["top1_agreement"] == 1.0 and doc["max_probability_difference"] < 1e-4
    assert (tmp_path / "sm" / "saved_model.pb").is_file() and (tmp_path / "sm" / "labels.txt").is_file()
    data = _data(run_dir)
    photos = [data / "blue" / "b3.jpg", data / "red" / "r5.jpg"]
    expected = _predicted(cli, run_dir, *photos)
    encoded = np.array([p.read_bytes() for p in photos], dtype=object)
    served = _saved_model_cli(tmp_path / "sm", "serving_default", "images", encoded, tmp_path)
    top = [line.split("'")[1] for line in served.split("Result for output key classes:")[1].splitlines()[1:3]]
    assert top == expected == ["blue", "red"], served
    import tensorflow as tf

    pixels = tf.io.decode_jpeg(photos[1].read_bytes()).numpy()[None].astype(np.float32)
    by_pixels = tf.saved_model.load(str(tmp_path / "sm")).signatures["pixels"](images=tf.constant(pixels))
    assert by_pixels["classes"].numpy()[0, 0].decode() == "red"


def test_export_refuses_bad_options(cli, run_dir, tmp_path):
    (tmp_path / "sm").mkdir()
    again = cli("export", run_dir, "--out", tmp_path / "sm", "--format", "savedmodel", "--quiet")
    assert again.exit_code == 2 and "already exists" in again.stderr
    bad = cli("export", run_dir, "--out", tmp_path / "m.tflite", "--format", "coreml", "--quiet")
    assert bad.exit_code == 2 and "unknown --format" in bad.stderr
    mixed = cli("export", run_dir, "--out", tmp_path / "s2", "--format", "savedmodel", "--quantize", "int8", "--quiet")
    assert mixed.exit_code == 2 and "tflite only" in mixed.stderr
    assert not list(tmp_path.glob(".export-*")) and not (tmp_path / "m.tflite").exists()


def _old_format(run_dir, dest):
    """The run as tlcli saved it before models were portable: tlcli's own layers, the views stacked as input."""
    import shutil

    import keras

    from tlcli.data import images
    from tlcli.models.layers import FoldViews, Preprocess, UnfoldViews
    from tlcli.models.run import load_run

    model, meta, _ = load_run(run_dir)
    views = model.get_layer("views")
    backbone = next(layer for layer in views.layers if isinstance(layer, keras.Model))
    n = len(images.views(meta["resize"]))
    pixels = keras.Input(images.pixel_shape(meta["input_size"], meta["resize"]), name="pixels")
    x = Preprocess("mobilenet", name="preprocess")(FoldViews(name="fold_views")(pixels))
    features = keras.Model(pixels, UnfoldViews(n, name="unfold_views")(backbone(x)), name="features")
    inputs = keras.Input(images.pixel_shape(meta["input_size"], meta["resize"]), name="pixels")
    old = keras.Model(inputs, views.get_layer("head")(features(inputs)), name="tlcli_mobilenet")
    shutil.copytree(run_dir.resolve(), dest)
    (dest / "model.keras").unlink()
    old.save(dest / "model.keras")
    return dest


def test_runs_saved_before_still_work(cli, run_dir, tmp_path):
    old = _old_format(run_dir, tmp_path / "old-run")
    assert "tlcli>Preprocess" in zipfile.ZipFile(old / "model.keras").read("config.json").decode()
    data = _data(run_dir)
    assert _predicted(cli, old, data / "red" / "r1.jpg", data / "blue" / "b1.jpg") == ["red", "blue"]
    evaluated = cli("evaluate", old, data, "--json", "--quiet")
    assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["accuracy"] == 1.0
    exported = cli("export", old, "--out", tmp_path / "old.tflite", "--json", "--quiet")
    assert exported.exit_code == 0, exported.output
    ideal = cli("ideal-image", "red", "--model", old, "--steps", "2", "--out", tmp_path / "i.png", "--json", "--quiet")
    assert ideal.exit_code == 0 and (tmp_path / "i.png").is_file(), ideal.output
    attacked = cli(
        "adversarial", data / "red" / "r2.jpg", "--target", "blue", "--model", old, "--steps", "2",
        "--out", tmp_path / "a.png", "--json", "--quiet",
    )  # fmt: skip
    assert attacked.exit_code in (0, 1) and (tmp_path / "a.png").is_file(), attacked.output
