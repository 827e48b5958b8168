"""ideal-image and features through the CLI, with the offline MobileNet v1 0.25 ImageNet weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlcli.explain.ideal import total_variation

TABBY = ("ideal-image", "tabby", "--backbone", "mobilenet", "--alpha", "0.25", "--quiet")


@pytest.fixture(scope="module")
def invoke(runner, keras_home):
    """Like the ``cli`` fixture, but usable from module-scoped fixtures."""
    from tlcli.cli.app import app

    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im, np.uint8)


@pytest.fixture(scope="module")
def imagenet(keras_home):
    from tlcli.models import classifier

    return classifier.from_backbone("mobilenet", 0.25)


@pytest.fixture(scope="module")
def ideal(invoke, tmp_path_factory):
    """Default settings (with a GIF) and the same run with --tv-weight 0."""
    tmp = tmp_path_factory.mktemp("ideal")
    smooth = _json(invoke(*TABBY, "--out", tmp / "smooth.png", "--gif", tmp / "loop.gif", "--json"))
    noisy = _json(invoke(*TABBY, "--out", tmp / "noisy.png", "--tv-weight", "0", "--json"))
    return smooth, noisy, tmp


def test_default_ideal_tabby_scores_high_after_saving(ideal, imagenet):
    smooth, _, tmp = ideal
    assert smooth["probability"] >= 0.9 and smooth["top"][0]["class"] == "tabby"
    pixels = _pixels(tmp / "smooth.png")
    assert pixels.shape == (224, 224, 3)
    reloaded = imagenet.probabilities(pixels[None])[0]
    tabby = imagenet.resolve("tabby")
    assert reloaded[tabby] >= 0.9 and int(np.argmax(reloaded)) == tabby
    assert reloaded[tabby] == pytest.approx(smooth["probability"], abs=1e-3)
    assert smooth["tv_weight"] > 0 and smooth["steps"] > 0 and smooth["seconds"] > 0


def test_tv_penalty_makes_it_smoother_and_both_reach_the_target(ideal, imagenet):
    smooth, noisy, tmp = ideal
    assert noisy["probability"] >= 0.9 and noisy["top"][0]["class"] == "tabby"
    noisy_pixels = _pixels(tmp / "noisy.png")
    assert imagenet.probabilities(noisy_pixels[None])[0][imagenet.resolve("tabby")] >= 0.9
    tv_smooth, tv_noisy = total_variation(_pixels(tmp / "smooth.png")), total_variation(noisy_pixels)
    assert tv_smooth == pytest.approx(smooth["total_variation"], abs=1e-3)
    assert tv_noisy == pytest.approx(noisy["total_variation"], abs=1e-3)
    assert tv_smooth < 0.5 * tv_noisy


def test_gif_of_the_optimisation_loop(ideal):
    smooth, _, tmp = ideal
    with Image.open(tmp / "loop.gif") as gif:
        assert gif.format == "GIF" and gif.size == (224, 224)
        assert gif.n_frames >= 5 and gif.n_frames == smooth["gif_frames"]
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB"), np.float64)
        gif.seek(0)
        first = np.asarray(gif.convert("RGB"), np.float64)
    assert np.abs(last - first).mean() > 1


def test_upscale_enlarges_png_and_gif(invoke, tmp_path):
    result = invoke(
        *TABBY, "--steps", "4", "--upscale", "2", "--out", tmp_path / "big.png", "--gif", tmp_path / "b.gif"
    )
    assert result.exit_code == 0, result.output
    assert "tabby: probability" in result.stdout
    big = _pixels(tmp_path / "big.png")
    assert big.shape == (448, 448, 3)
    assert (big[::2, ::2] == big[1::2, 1::2]).all() and (big[::2, ::2] == big[::2, 1::2]).all()
    with Image.open(tmp_path / "b.gif") as gif:
        assert gif.size == (448, 448)


def test_unknown_class_exits_2_with_suggestions(cli, keras_home, tmp_path):
    result = cli(*[a if a != "tabby" else "tabbby" for a in TABBY], "--out", tmp_path / "x.png")
    assert result.exit_code == 2
    assert "tabbby" in result.stderr and "closest" in result.stderr and "tabby" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--out", "ideal.jpg"), "must end in .png"),
        (("--gif", "loop.png"), "must end in .gif"),
        (("--model", "runs/x"), "either --model"),
    ],
)
def test_bad_ideal_image_options_exit_2(cli, tmp_path, extra, message):
    result = cli(*TABBY, "--out", tmp_path / "x.png", *extra)
    assert result.exit_code == 2 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def run_dir(colour_run) -> Path:
    """A tiny trained run, read only: red vs blue photos, MobileNet 0.25 at 96 px (conftest.colour_run)."""
    return colour_run.latest


def test_ideal_image_of_a_trained_run(invoke, run_dir, tmp_path):
    from tlcli.models import classifier

    summary = _json(
        invoke("ideal-image", "red", "--model", run_dir, "--steps", "40", "--out", tmp_path / "red.png", "--json", "-q")
    )
    assert summary["target"] == "red" and summary["size"] == 96 and summary["probability"] >= 0.9
    pixels = _pixels(tmp_path / "red.png")
    assert pixels.shape == (96, 96, 3)
    clf = classifier.from_run(run_dir)
    assert clf.top(pixels, 1)[0]["class"] == "red"
    assert clf.probabilities(pixels[None])[0][clf.resolve("red")] >= 0.9


def test_imagenet_class_on_a_trained_run_exits_2(invoke, run_dir, tmp_path):
    result = invoke("ideal-image", "tabby", "--model", run_dir, "--out", tmp_path / "x.png", "--quiet")
    assert result.exit_code == 2 and "unknown class 'tabby'" in result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def cat_photo(shared_data) -> Path:
    return sorted((shared_data / "imagenet_samples").glob("*_tabby/*.jpg"))[0]


VGG = ("features", "--backbone", "vgg16", "--weights", "none", "--size", "64", "--quiet")


def test_vgg16_feature_grid(cli, cat_photo, tmp_path):
    summary = _json(
        cli(*VGG[:1], cat_photo, *VGG[1:], "--layer", "block3_conv3", "--out", tmp_path / "f.png", "--json")
    )
    assert summary["layer"] == "block3_conv3" and summary["shape"] == [16, 16, 256]
    means = [c["mean"] for c in summary["channels"]]
    assert len(means) == 16 and means == sorted(means, reverse=True)
    with Image.open(tmp_path / "f.png") as im:
        assert im.format == "PNG" and list(im.size) == summary["grid_size"]
        grid = np.asarray(im.convert("RGB"))
    assert grid.std() > 10


def test_mobilenet_feature_grid_default_layer(cli, keras_home, cat_photo, tmp_path):
    result = cli(
        "features",
        cat_photo,
        "--backbone",
        "mobilenet",
        "--alpha",
        "0.25",
        "--channels",
        "8",
        "--out",
        tmp_path / "m.png",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "strongest channels" in result.stdout
    with Image.open(tmp_path / "m.png") as im:
        assert im.format == "PNG" and im.width > 200


def test_list_layers(cli):
    layers = _json(cli("features", "--list-layers", *VGG[1:], "--json"))
    by_name = {row["name"]: row for row in layers}
    assert by_name["block3_conv3"]["shape"] == [16, 16, 256] and by_name["block3_conv3"]["type"] == "Conv2D"
    assert "block3_conv3" in cli("features", "--list-layers", *VGG[1:]).stdout


def test_unknown_layer_exits_2_with_close_names(cli, cat_photo, tmp_path):
    result = cli(*VGG[:1], cat_photo, *VGG[1:], "--layer", "block3_conv", "--out", tmp_path / "f.png")
    assert result.exit_code == 2 and "block3_conv3" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"not an image at all\n", b"", None])
def test_non_image_exits_2_in_one_line(cli, tmp_path, content):
    path = tmp_path / "photo.jpg"
    if content is not None:
        path.write_bytes(content)
    result = cli(*VGG[:1], path, *VGG[1:], "--out", tmp_path / "f.png")
    assert result.exit_code == 2 and "photo.jpg" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "f.png").exists()


def test_total_variation_helper():
    flat = np.full((8, 8, 3), 90, np.uint8)
    stripes = np.zeros((8, 8, 3), np.uint8)
    stripes[:, ::2] = 255
    assert total_variation(flat) == 0.0
    assert total_variation(stripes) == pytest.approx(255 / 2)
