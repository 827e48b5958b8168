"""model.keras leaves tlcli: plain Keras (tlcli blocked from import) loads a run and predicts what tlcli predicts;
the exported SavedModel fed real photos' file bytes agrees with tlcli predict (the offline ImageNet weights)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SIZE = ("--alpha", "0.25", "--size", "96", "--quiet")
PLAIN_KERAS = """
import json, sys
sys.modules["tlcli"] = None  # a Python without tlcli
import keras, numpy as np
out = []
for model_file, photos_file in zip(sys.argv[1::2], sys.argv[2::2]):
    model = keras.saving.load_model(model_file)  # safe_mode on, no custom_objects
    photos = np.load(photos_file)
    out.append([model.predict(photos[k][None], verbose=0)[0].tolist() for k in sorted(photos, key=int)])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def real_runs(keras_home, shared_data, tmp_path_factory):
    """Runs of the default multi-view recipe and of a centre crop, on 24 cats and 24 dogs of ../shared/data."""
    from typer.testing import CliRunner

    from tlcli.cli.app import app

    root = tmp_path_factory.mktemp("portable")
    for kind in ("cat", "dog"):
        (root / "data" / kind).mkdir(parents=True)
        for photo in sorted((shared_data / "cats_vs_dogs" / kind).glob("*.jpg"))[:24]:
            shutil.copy(photo, root / "data" / kind / photo.name)
    runner = CliRunner()
    runs = {}
    for resize in ("crop+pad", "crop"):
        store, out = root / f"f-{resize}", root / f"runs-{resize}"
        done = runner.invoke(app, ["extract", str(root / "data"), "--out", str(store), "--resize", resize, *SIZE])
        assert done.exit_code == 0, done.output
        assert runner.invoke(app, ["train-head", str(store), "--out", str(out), "--quiet"]).exit_code == 0
        runs[resize] = out / "latest"
    return runs


def _photos(run: Path, shared_data: Path) -> list[str]:
    meta = json.loads((run / "meta.json").read_text())
    samples = sorted(str(p) for p in (shared_data / "imagenet_samples").rglob("*.jpg"))
    return [str(Path(meta["data_dir"]) / rel) for rel, _ in meta["test_files"]] + samples


def test_plain_keras_loads_the_runs_and_predicts_what_tlcli_predicts(real_runs, shared_data, tmp_path):
    """A centre-crop run and a crop+pad one, on the pixels tlcli decoded (test photos and imagenet_samples)."""
    from tlcli.data import images
    from tlcli.models.graph import apply_model
    from tlcli.models.run import load_run

    expected, args = [], []
    for resize, run in real_runs.items():
        model, meta, _ = load_run(run)
        paths = _photos(run, shared_data)
        probs, kept, _ = apply_model(model, paths, meta["input_size"], meta["resize"])
        assert len(kept) == len(paths) > 20
        expected.append(probs)
        photos = {str(i): images.photo(p, meta["input_size"]) for i, p in enumerate(paths)}
        np.savez(tmp_path / f"{resize}.npz", **photos)
        args += [str(run / "model.keras"), str(tmp_path / f"{resize}.npz")]
    done = subprocess.run([sys.executable, "-c", PLAIN_KERAS, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    for got, want in zip(plain, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_export_fed_file_bytes_agrees_with_predict_on_real_photos(real_runs, shared_data, tmp_path):
    """The skew of the deployed model: tlcli's decoding (PIL) against the SavedModel's own (TensorFlow) on the
    photos' bytes; and that of the views (PIL's against the model's Resizing) between the head on stored
    features and the saved model."""
    import tensorflow as tf

    from tlcli.models.graph import apply_model
    from tlcli.models.run import load_run
    from tlcli.store.features import Store
    from tlcli.train import export

    run = real_runs["crop+pad"]
    summary = export.export(run, tmp_path / "sm", fmt="savedmodel")
    assert summary["top1_agreement"] == 1.0 and summary["max_probability_difference"] < 1e-4
    model, meta, _ = load_run(run)
    samples = sorted((shared_data / "imagenet_samples").rglob("*.jpg"))
    reference, _, _ = apply_model(model, [str(p) for p in samples], meta["input_size"], meta["resize"])
    serve = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]
    served = serve(images=tf.constant([p.read_bytes() for p in samples]))["scores"].numpy()
    assert (served.argmax(1) == reference.argmax(1)).all() and np.abs(served - reference).max() < 1e-4
    store = Store.open(Path(meta["features_dir"]))
    split = store.split("test")
    head = model.get_layer("views").get_layer("head")
    stored = np.asarray(head(split.features, training=False))
    photos, _, _ = apply_model(model, [meta["data_dir"] + "/" + p for p in split.paths], 96, meta["resize"])
    assert (photos.argmax(1) == stored.argmax(1)).all() and np.abs(photos - stored).max() < 0.05
