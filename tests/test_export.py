"""export: TFLite and SavedModel files that agree with the Keras model before they are written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture()
def run_dir(colour_run) -> Path:
    """The session's trained colour run (conftest.colour_run); export only reads it."""
    return colour_run.latest


@pytest.mark.parametrize("quantize", ["none", "dynamic", "float16"])
def test_tflite_agrees_with_keras(cli, run_dir, tmp_path, quantize):
    out = tmp_path / f"{quantize}.tflite"
    res = cli("export", run_dir, "--out", out, "--quantize", quantize, "--json", "--quiet")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["top1_agreement"] >= 0.99 and doc["checked_images"] == 24
    assert out.read_bytes()[4:8] == b"TFL3"
    assert out.with_suffix(".labels.txt").read_text().split() == ["blue", "red"]
    import tensorflow as tf

    from tlcli.data import images
    from tlcli.models.run import load_run

    model, meta, _ = load_run(run_dir)
    pixels = images.load(Path(meta["data_dir"]) / "red" / "r0.jpg", 96, meta["resize"])
    interpreter = tf.lite.Interpreter(model_path=str(out))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], (1, *pixels.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], pixels[None].astype(np.float32))
    interpreter.invoke()
    probs = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
    assert probs.argmax() == 1  # red


def test_savedmodel_and_bad_options(cli, run_dir, tmp_path):
    res = cli("export", run_dir, "--out", tmp_path / "sm", "--format", "savedmodel", "--json", "--quiet")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["top1_agreement"] == 1.0 and doc["max_probability_difference"] < 1e-4
    assert (tmp_path / "sm" / "saved_model.pb").is_file() and (tmp_path / "sm" / "labels.txt").is_file()
    again = cli("export", run_dir, "--out", tmp_path / "sm", "--format", "savedmodel", "--quiet")
    assert again.exit_code == 2 and "already exists" in again.stderr
    bad = cli("export", run_dir, "--out", tmp_path / "m.tflite", "--format", "onnx", "--quiet")
    assert bad.exit_code == 2 and "unknown --format" in bad.stderr
    mixed = cli("export", run_dir, "--out", tmp_path / "s2", "--format", "savedmodel", "--quantize", "int8", "--quiet")
    assert mixed.exit_code == 2 and "tflite only" in mixed.stderr
    assert not list(tmp_path.glob(".export-*")) and not (tmp_path / "m.tflite").exists()
