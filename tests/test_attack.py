"""adversarial: dogs that the offline MobileNet (and a trained head) call cats, surviving a PNG round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

DOGS = ("beagle", "golden_retriever", "Labrador_retriever", "German_shepherd", "pug")


def _photo(shared_data, name: str):
    folder = next(p for p in (shared_data / "imagenet_samples").iterdir() if p.name.endswith(name))
    return next(folder.iterdir())


@pytest.fixture(scope="module")
def pgd_results(keras_home, shared_data, tmp_path_factory):
    from typer.testing import CliRunner

    from tlcli.cli.app import app

    out = tmp_path_factory.mktemp("adv")
    results = {}
    for dog in DOGS:
        png = out / f"{dog}.png"
        res = CliRunner().invoke(
            app,
            [
                "adversarial",
                str(_photo(shared_data, dog)),
                "--target",
                "tabby",
                "--alpha",
                "0.25",
                "--method",
                "pgd",
                "--eps",
                "2",
                "--out",
                str(png),
                "--json",
            ],
        )
        assert res.exit_code == 0, res.output
        results[dog] = (png, json.loads(res.stdout))
    return results


def test_pgd_turns_every_dog_into_a_tabby_within_two_levels(pgd_results):
    for dog, (png, report) in pgd_results.items():
        assert report["success"] and report["after"][0]["class"] == "tabby", dog
        assert report["before"][0]["class"] != "tabby"
        assert report["linf"] <= 2 and report["psnr_db"] > 40
        original = report["before"]
        assert original and report["targeted"] and report["method"] == "pgd"
        for key in ("perturbation", "figure"):
            Image.open(report["files"][key]).verify()
        assert Image.open(png).size == (224, 224)


def test_saved_pngs_fool_plain_keras_in_a_fresh_process(pgd_results, keras_home):
    pngs = [str(png) for png, _ in pgd_results.values()]
    code = (
        "import sys, numpy as np, keras\n"
        "from PIL import Image\n"
        "m = keras.applications.MobileNet(alpha=0.25, weights='imagenet')\n"
        "x = np.stack([np.asarray(Image.open(p).convert('RGB'), np.float32) for p in sys.argv[1:]])\n"
        "preds = m.predict(keras.applications.mobilenet.preprocess_input(x), verbose=0)\n"
        "print(' '.join(t[0][1] for t in keras.applications.mobilenet.decode_predictions(preds, top=1)))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *pngs],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_HOME": str(keras_home), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["tabby"] * len(pngs)


def test_the_change_is_within_budget_pixel_by_pixel(pgd_results, shared_data):
    from tlcli.data import images

    png, _ = pgd_results["pug"]
    original = images.load(_photo(shared_data, "pug"), 224, "crop").astype(int)
    adversarial = np.asarray(Image.open(png)).astype(int)
    assert 0 < np.abs(adversarial - original).max() <= 2


@pytest.fixture(scope="module")
def cats_dogs_run(keras_home, shared_data, tmp_path_factory):
    from typer.testing import CliRunner

    from tlcli.cli.app import app

    work = tmp_path_factory.mktemp("cvd")
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "extract",
            str(shared_data / "cats_vs_dogs"),
            "--out",
            str(work / "f"),
            "--alpha",
            "0.25",
            "--size",
            "112",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train-head", str(work / "f"), "--out", str(work / "runs"), "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["test_accuracy"] >= 0.85
    return work / "runs" / "latest"


@pytest.mark.slow
def test_head_trained_on_cats_vs_dogs_is_fooled_into_cat(cli, cats_dogs_run, shared_data, tmp_path):
    dogs = sorted((shared_data / "cats_vs_dogs" / "dog").iterdir())[:3]
    for i, dog in enumerate(dogs):
        before = json.loads(cli("predict", cats_dogs_run, dog, "--json").stdout.splitlines()[0])
        if before["top"][0]["class"] != "dog":
            continue
        png = tmp_path / f"dog{i}.png"
        res = cli(
            "adversarial",
            dog,
            "--model",
            cats_dogs_run,
            "--target",
            "cat",
            "--method",
            "pgd",
            "--eps",
            "2",
            "--out",
            png,
            "--json",
            "--quiet",
        )
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        assert report["success"] and report["linf"] <= 2
        again = json.loads(cli("predict", cats_dogs_run, png, "--json").stdout.splitlines()[0])
        assert again["top"][0]["class"] == "cat", again


def test_fgsm_gd_and_untargeted(cli, keras_home, shared_data, tmp_path):
    tiger = _photo(shared_data, "tiger")
    fgsm = cli(
        "adversarial",
        tiger,
        "--untargeted",
        "--alpha",
        "0.25",
        "--method",
        "fgsm",
        "--eps",
        "4",
        "--out",
        tmp_path / "f.png",
        "--json",
        "--quiet",
    )
    report = json.loads(fgsm.stdout)
    assert report["steps"] == 1 and report["linf"] <= 4 and not report["targeted"]
    assert fgsm.exit_code == (0 if report["success"] else 1)
    gd = cli(
        "adversarial",
        _photo(shared_data, "beagle"),
        "--target",
        "tabby",
        "--alpha",
        "0.25",
        "--method",
        "gd",
        "--out",
        tmp_path / "g.png",
        "--json",
        "--quiet",
    )
    assert gd.exit_code == 0, gd.output
    report = json.loads(gd.stdout)
    assert report["success"] and report["after"][0]["class"] == "tabby" and report["psnr_db"] > 35


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "tabbby"], "closest: tabby"),
        (["--target", "tabby", "--eps", "0"], "--eps must be greater than 0"),
        (["--target", "tabby", "--eps", "-1"], "--eps must be greater than 0"),
        ([], "either --target CLASS or --untargeted"),
        (["--target", "tabby", "--out", "x.jpg"], "must end in .png"),
    ],
)
def test_bad_attack_options_exit_2(cli, keras_home, shared_data, tmp_path, args, message):
    res = cli("adversarial", _photo(shared_data, "pug"), "--alpha", "0.25", *args)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and message in errors[0]


def test_not_an_image_and_class_missing_from_a_trained_model(cli, keras_home, colour_run, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    res = cli("adversarial", text, "--target", "tabby", "--alpha", "0.25", "--out", tmp_path / "a.png")
    assert res.exit_code == 2 and "not a readable image" in res.stderr
    res = cli("adversarial", text, "--target", "tabby", "--model", colour_run.latest, "--out", tmp_path / "a.png")
    assert res.exit_code == 2 and "unknown class 'tabby'" in res.stderr and "blue, red" in res.stderr
    assert not (tmp_path / "a.png").exists()


def test_weights_without_the_imagenet_top_are_refused(cli, keras_home, shared_data, tmp_path):
    no_top = keras_home / "models" / "mobilenet_2_5_224_tf_no_top.h5"
    res = cli(
        "adversarial",
        _photo(shared_data, "pug"),
        "--target",
        "tabby",
        "--alpha",
        "0.25",
        "--weights",
        no_top,
        "--out",
        tmp_path / "a.png",
    )
    assert res.exit_code == 2 and "does not fit mobilenet (include_top=True)" in res.stderr
