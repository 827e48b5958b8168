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
    from tlcli.cli.app import app

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
    from tlcli.models.run import load_run

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
        "--no-refit",
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


def test_fine_tuning_with_refit_trains_on_train_and_val_for_every_epoch(cli, tiny_store, tmp_path):
    """--refit (the default), as for the head: fine-tuning then runs every epoch on train+val and keeps the
    last weights; the run's val accuracy is the early-stopped head's, taken before anything trained on val."""
    from tlcli.models.run import load_run
    from tlcli.store.features import Store

    args = ("--fine-tune-layers", "2", "--fine-tune-epochs", "3", "--fine-tune-patience", "1", "--json", "--quiet")
    result = cli("train-head", tiny_store, "--out", tmp_path / "runs", *args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["fine_tune_epochs_run"] == summary["fine_tune_best_epoch"] == 3 and summary["refit_epochs"] >= 1
    _, meta, run = load_run(tmp_path / "runs" / "latest")
    history = json.loads((run / "history.json").read_text())
    assert set(history["fine_tune"]) == {"loss", "accuracy"} and "refit_loss" in history
    assert meta["fine_tune"]["on"] == "train+val, every epoch" and meta["fine_tune"]["start_val_loss"] is None
    store = Store.open(tiny_store)
    n = len(store.split("train").labels) + len(store.split("val").labels)
    assert f"fine-tuned 2 layers on {n} images for 3 epochs" in (run / "train.log").read_text()
    head_only = cli("train-head", tiny_store, "--out", tmp_path / "head", "--json", "--quiet")
    assert json.loads(head_only.stdout)["val_accuracy"] == summary["val_accuracy"]


def test_fine_tuning_that_never_beats_the_head_keeps_its_weights_and_says_so(cli, tiny_store, tmp_path):
    from tlcli.models.run import load_run

    args = (
        "--fine-tune-layers",
        "1",
        "--fine-tune-lr",
        "1e-12",
        "--fine-tune-epochs",
        "2",
        "--fine-tune-patience",
        "1",
        "--no-refit",
    )
    result = cli("train-head", tiny_store, "--out", tmp_path / "runs", *args)
    assert result.exit_code == 0, result.output
    assert "fine-tuning never beat the head-only start on val loss in 1 epoch;" in result.stdout
    assert "the run keeps the head-only weights" in result.stdout
    model, meta, run = load_run(tmp_path / "runs" / "latest")
    assert meta["fine_tune"]["best_epoch"] == 0 and meta["fine_tune"]["epochs_run"] == 1
    assert "no epoch beat the head-only start, whose weights are kept" in (run / "train.log").read_text()


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
    (("--fine-tune-layers", "2", "--strategy", "multiworker"), "reads the cluster from TF_CONFIG, which is missing"),
]


def test_bad_fine_tune_options_exit_2_with_one_line(cli, tiny_store, tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for args, message in BAD_OPTIONS:
        result = cli("train-head", tiny_store, "--out", tmp_path / "runs", *args, "--quiet")
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.output and not (tmp_path / "runs" / "latest").exists()


def test_every_recipe_field_is_an_option_of_its_commands():
    """The recipes are the one source of option names and defaults: each head field is a parameter of
    train-head and cross-validate defaulting to HEAD's value; each fine-tuning field one of train-head
    defaulting to None (not given: no fine-tuning, or the recipe's value)."""
    import dataclasses

    import typer

    from tlcli.cli.train import cross_validate_cmd, train_head_cmd
    from tlcli.train.recipes import HEAD, FineTuneRecipe, HeadRecipe, param

    def defaults(command) -> dict:
        app = typer.Typer()
        app.command()(command)
        return {p.name: p.default for p in typer.main.get_command(app).params}

    for command in (train_head_cmd, cross_validate_cmd):
        given = defaults(command)
        for f in dataclasses.fields(HeadRecipe):
            assert given[param(HeadRecipe, f.name)] == getattr(HEAD, f.name), f.name
    given = defaults(train_head_cmd)
    assert all(given[param(FineTuneRecipe, f.name)] is None for f in dataclasses.fields(FineTuneRecipe))


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

    from tlcli.models import backbones
    from tlcli.train import finetune

    model = backbones.build("mobilenet", 0.25, 64, "none").model
    assert finetune.unfreeze(model, 2, None) == ["conv_dw_13", "conv_pw_13"]
    trainable = [layer.name for layer in model.layers[1:] if layer.trainable]
    assert trainable[:4] == ["conv_dw_13", "conv_dw_13_relu", "conv_pw_13", "conv_pw_13_relu"] and len(trainable) == 5
    assert not any(layer.trainable for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert len(model.trainable_weights) == 2
    assert finetune.unfreeze(model, None, "conv_pw_12_relu") == ["conv_dw_13", "conv_pw_13"]
    assert finetune.unfreeze(model, 27, None)[0] == "conv1" and len(model.trainable_weights) == 27


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(store: Path, runs: Path, *args: str) -> list:
    """Two local workers of one TF_CONFIG cluster on loopback ports, each running train-head with ``args``."""
    import os
    import subprocess
    import sys

    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    command = [sys.executable, "-m", "tlcli", "train-head", str(store), "--out", str(runs), "--fine-tune-layers", "2"]
    procs = []
    for i in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config), "CUDA_VISIBLE_DEVICES": ""}
        command_i = [*command, "--strategy", "multiworker", *args]
        procs.append(subprocess.Popen(command_i, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_multiworker_run_with_two_local_workers_saves_one_model(tiny_store, tmp_path):
    from tlcli.models.run import load_run

    procs = _start_workers(tiny_store, tmp_path / "runs", "--fine-tune-epochs", "2", "--json", "--quiet")
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [err for _, err in outputs] == ["", ""]  # --quiet: not a warning from TensorFlow or AutoGraph
    chief, other = (json.loads(out) for out, _ in outputs)
    assert (
        other["run"] is None and other["worker"] == 1 and other["fine_tune_epochs_run"] == chief["fine_tune_epochs_run"]
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([Path(chief["run"]).name, "latest"])
    model, meta, _ = load_run(tmp_path / "runs" / "latest")
    assert meta["fine_tune"]["strategy"] == "multiworker" and meta["fine_tune"]["replicas"] == 2
    assert model.output_shape == (None, 2)


@pytest.mark.slow
def test_multiworker_chief_stops_with_one_line_when_a_worker_dies(tiny_store, tmp_path):
    """TensorFlow's coordination service notices the dead worker's missing heartbeats and aborts the
    chief's collectives; the chief exits 1 with one line and leaves no run, no half-written file, no lock."""
    import time

    from tlcli.store.locks import LOCK_NAME

    runs = tmp_path / "runs"
    procs = _start_workers(tiny_store, runs, "--fine-tune-epochs", "1000", "--fine-tune-patience", "1000", "--quiet")
    try:
        deadline = time.monotonic() + 300
        while not (runs / LOCK_NAME).exists() and time.monotonic() < deadline:  # the chief locks once the cluster is up
            assert procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.5)
        time.sleep(5)
        assert [p.poll() for p in procs] == [None, None]
        procs[1].kill()
        out, err = procs[0].communicate(timeout=300)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1, err[-2000:]
    assert err.strip().splitlines() == [
        "error: the cluster lost a worker during fine-tuning (/job:worker/replica:0/task:1); nothing was saved: "
        "start every worker of TF_CONFIG again with the same command"
    ]
    assert list(runs.iterdir()) == []


def test_mirrored_strategy_fine_tunes_in_this_process(cli, tiny_store, tmp_path):
    result = cli(
        "train-head",
        tiny_store,
        "--out",
        tmp_path / "runs",
        "--fine-tune-layers",
        "1",
        "--fine-tune-epochs",
        "1",
        "--strategy",
        "mirrored",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "runs" / "latest" / "meta.json").read_text())
    assert meta["fine_tune"]["strategy"] == "mirrored" and meta["fine_tune"]["unfrozen"] == ["conv_pw_13"]


# Fine-tuning on real photos (../shared/data/cats_vs_dogs, offline MobileNet v1 0.25, the default recipe's
# input: 320, crop+pad). RECIPE, with train-head's defaults (refit: fine-tune every layer on train+val for
# 20 epochs, Adam at lr/10 with cosine decay), against train-head's head only, on 80/10/10 split 1.
# Measured there: head 0.96, fine-tuned 0.97 (deterministic: seeded, op determinism); the bars are the
# issue's (>= 0.96 and one point over the head). Cross-validated figures: README, Accuracy, Fine-tuning.
RECIPE = ("--fine-tune-layers", "27", "--augment", "flip,zoom,rotate")
SPLIT_SEED = 1
FINE_TUNED_BAR = 0.96
GAIN = 0.01


def _backbone_batchnorm(model, name: str) -> dict[str, list[np.ndarray]]:
    import keras

    backbone = model.get_layer("features").get_layer(name) if model.name != name else model
    return {
        layer.name: [np.array(w) for w in layer.weights]
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }


@pytest.mark.slow
def test_fine_tuning_beats_head_only_on_held_out_photos(cli, keras_home, shared_data, tmp_path, capsys):
    from tlcli.models import backbones
    from tlcli.models.run import load_run

    extracted = cli(
        "extract",
        shared_data / "cats_vs_dogs",
        "--out",
        tmp_path / "features",
        "--alpha",
        "0.25",
        "--size",
        "320",
        "--seed",
        SPLIT_SEED,
        "--quiet",
    )
    assert extracted.exit_code == 0, extracted.output
    accuracy = {}
    for name, extra in (("head", ()), ("fine-tuned", RECIPE)):
        runs = tmp_path / name
        trained = cli("train-head", tmp_path / "features", "--out", runs, "--seed", SPLIT_SEED, *extra, "--quiet")
        assert trained.exit_code == 0, trained.output
        evaluated = cli("evaluate", runs / "latest", "--json", "--quiet")
        assert evaluated.exit_code == 0, evaluated.output
        accuracy[name] = json.loads(evaluated.stdout)["accuracy"]
    with capsys.disabled():
        print(f"\ncats_vs_dogs split {SPLIT_SEED}: held-out accuracy {accuracy}")

    backbone = backbones.build("mobilenet", 0.25, 320).model
    imagenet = _backbone_batchnorm(backbone, backbone.name)
    assert len(imagenet) == 27
    for name in accuracy:
        model, meta, _ = load_run(tmp_path / name / "latest")
        saved = _backbone_batchnorm(model, backbone.name)
        assert saved.keys() == imagenet.keys()
        for layer, weights in imagenet.items():  # gamma, beta, moving mean, moving variance: all untouched
            for before, after in zip(weights, saved[layer], strict=True):
                np.testing.assert_array_equal(after, before, err_msg=f"{name} run changed {layer}")
    assert meta["fine_tune"]["best_epoch"] == meta["fine_tune"]["epochs_run"] == 20  # every epoch, last weights
    assert accuracy["fine-tuned"] >= FINE_TUNED_BAR, accuracy
    assert accuracy["fine-tuned"] >= accuracy["head"] + GAIN - 1e-9, accuracy
