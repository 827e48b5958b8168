"""Fine-tuning: the CLI path on tiny synthetic images (random weights), BatchNorm kept in inference mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .conftest import make_photo

TINY = ("--alpha", "0.25", "--size", "64", "--weights", "none", "--quiet")


@pytest.fixture(scope="module")
def tiny_store(runner, tmp_path_factory) -> Path:
    from tlcli.cli import app

    root = tmp_path_factory.mktemp("finetune")
    for i in range(12):
        make_photo(root / "colours" / "red" / f"r{i}.jpg", (200, 40, 40), seed=i)
        make_photo(root / "colours" / "blue" / f"b{i}.jpg", (40, 40, 200), seed=100 + i)
    result = runner.invoke(app, ["extract", str(root / "colours"), "--out", str(root / "features"), *TINY])
    assert result.exit_code == 0, result.output
    return root / "features"


def _moving_stats(model) -> dict[str, list[np.ndarray]]:
    import keras

    stats = {}
    for layer in model.get_layer("features").get_layer("mobilenet_0.25_64").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            stats[layer.name] = [np.array(layer.moving_mean), np.array(layer.moving_variance)]
    return stats


def test_fine_tune_cli_saves_a_run_with_both_stages(cli, tiny_store, tmp_path):
    from tlcli.head import load_run

    result = cli(
        "train-head",
        tiny_store,
        "--out",
        tmp_path / "runs",
        "--fine-tune-layers",
        "2",
        "--augment",
        "flip,rotate",
        "--fine-tune-epochs",
        "2",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 1 <= summary["fine_tune_epochs_run"] <= 2
    model, meta, run = load_run(tmp_path / "runs" / "latest")
    assert Path(summary["run"]) == run
    history = json.loads((run / "history.json").read_text())
    assert len(history["loss"]) == summary["epochs_run"] and "refit_loss" not in history
    assert set(history["fine_tune"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history["fine_tune"]["loss"]) == summary["fine_tune_epochs_run"]
    ft = meta["fine_tune"]
    assert ft["layers"] == 2 and ft["augment"] == ["flip", "rotate"] and ft["learning_rate"] == pytest.approx(1e-4)
    assert ft["unfrozen"] == ["conv_dw_13", "conv_pw_13"]
    assert {layer.name for layer in model.layers} == {"pixels", "features", "head"}  # no augmentation layers
    for stats in _moving_stats(model).values():  # --weights none starts every BN at mean 0, variance 1
        np.testing.assert_array_equal(stats[0], 0.0)
        np.testing.assert_array_equal(stats[1], 1.0)
    pixels = np.random.default_rng(0).uniform(0, 255, (3, *model.input_shape[1:])).astype("float32")
    np.testing.assert_allclose(model(pixels, training=False), model(pixels, training=False))
    evaluated = cli("evaluate", run, "--json", "--quiet")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == meta["test_accuracy"]


BAD_OPTIONS = [
    (("--fine-tune-layers", "-1"), "--fine-tune-layers must be at least 1"),
    (("--fine-tune-layers", "2", "--augment", "nope"), "unknown or repeated augmentation in --augment 'nope'"),
    (("--fine-tune-layers", "2", "--fine-tune-from", "conv_pw_13"), "not both"),
    (("--augment", "flip"), "--augment only take effect with fine-tuning"),
    (("--strategy", "mirrored"), "--strategy only take effect with fine-tuning"),
    (("--fine-tune-layers", "2", "--strategy", "ring"), "unknown --strategy 'ring'"),
    (("--fine-tune-layers", "2", "--fine-tune-lr", "0"), "--fine-tune-lr must be above 0"),
    (("--fine-tune-from", "no_such_layer"), "'no_such_layer' is not a layer of mobilenet_0.25_64"),
    (("--fine-tune-from", "conv_pw_13_bnn"), "did you mean conv_pw_13_bn"),
    (("--fine-tune-from", "conv_pw_13_relu"), "no layer with weights from there up"),
    (("--fine-tune-layers", "28"), "mobilenet_0.25_64 has only 27 layers with weights"),
]


def test_bad_fine_tune_options_exit_2_with_one_line(cli, tiny_store, tmp_path):
    for args, message in BAD_OPTIONS:
        result = cli("train-head", tiny_store, "--out", tmp_path / "runs", *args, "--quiet")
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.output and not (tmp_path / "runs" / "latest").exists()


def test_frozen_batchnorm_runs_in_inference_mode_when_training():
    """Keras 3: a BatchNormalization layer with trainable=False normalises with its moving statistics and
    leaves them alone even under training=True (the fine-tuning trap of Keras issues 9214 and 11590)."""
    import keras

    layer = keras.layers.BatchNormalization()
    x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4)).astype("float32")
    layer(x)
    layer.moving_mean.assign(np.full(4, 1.0, "float32"))
    layer.moving_variance.assign(np.full(4, 4.0, "float32"))
    layer.trainable = False
    inference = np.asarray(layer(x, training=False))
    np.testing.assert_allclose(np.asarray(layer(x, training=True)), inference, rtol=1e-6)
    np.testing.assert_allclose(inference, (x - 1.0) / np.sqrt(4.0 + layer.epsilon), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(layer.moving_mean), 1.0)
    layer.trainable = True
    assert not np.allclose(np.asarray(layer(x, training=True)), inference)


def test_unfreeze_counts_layers_with_weights_from_the_top_and_keeps_batchnorm_frozen():
    import keras

    from tlcli import backbones, finetune

    model = backbones.build("mobilenet", 0.25, 64, "none").model
    assert finetune.unfreeze(model, 2, None) == ["conv_dw_13", "conv_pw_13"]
    trainable = [layer.name for layer in model.layers[1:] if layer.trainable]
    assert trainable[:4] == ["conv_dw_13", "conv_dw_13_relu", "conv_pw_13", "conv_pw_13_relu"] and len(trainable) == 5
    assert not any(layer.trainable for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert len(model.trainable_weights) == 2
    assert finetune.unfreeze(model, None, "conv_pw_12_relu") == ["conv_dw_13", "conv_pw_13"]
    assert finetune.unfreeze(model, 27, None)[0] == "conv1" and len(model.trainable_weights) == 27
