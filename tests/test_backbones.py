"""Every registered backbone builds and gives its features; one of each family extracts and trains a head.

Random weights, small inputs.
"""

from __future__ import annotations

import re
import zipfile

import numpy as np
import pytest

from tlcli.errors import UsageError
from tlcli.models import backbones, graph
from tlcli.models.portable import features_model
from tlcli.store import features
from tlcli.train import extract, trainer
from tlcli.train.recipes import ExtractRecipe, HeadRecipe

from .conftest import make_photo

# The smallest member of each family goes the whole way (extract, train-head, a saved run); the
# others share its code and are checked for what is their own: the registry entry and the built graph.
# Every family but the default backbone's is marked slow: minutes of building graphs in all, run in CI.
SMALLEST = {
    min((n for n in backbones.SPECS if backbones.SPECS[n].family == f), key=lambda n: backbones.SPECS[n].params)
    for f in {sp.family for sp in backbones.SPECS.values()}
}
DEFAULT = "mobilenet"


def families(names) -> list:
    """``names`` sorted, as parameters, all but DEFAULT marked slow."""
    return [n if n == DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in sorted(names)]


OTHERS = families(n for n in backbones.SPECS if n not in SMALLEST)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for i in range(4):
        make_photo(root / "red" / f"r{i}.png", (220, 30, 30), size=(24, 20), seed=i, fmt="PNG")
        make_photo(root / "blue" / f"b{i}.png", (30, 30, 220), size=(24, 20), seed=10 + i, fmt="PNG")
    return root


def _size_and_alpha(name: str) -> tuple[int, float | None]:
    sp = backbones.SPECS[name]
    return (sp.size if sp.fixed_size else max(sp.min_size, 32)), (sp.alphas[0] if sp.alphas else None)


@pytest.mark.parametrize("name", families(SMALLEST))
def test_backbone_builds_extracts_and_trains(name, tiny_dataset, tmp_path):
    sp = backbones.SPECS[name]
    size, alpha = _size_and_alpha(name)
    recipe = ExtractRecipe(
        backbone=name, alpha=alpha, size=size, weights="none", resize="crop", fractions=(0.5, 0.25, 0.25), batch_size=8
    )
    summary = extract.extract(tiny_dataset, tmp_path / "f", recipe)
    assert summary["stored"] == 8 and not summary["skipped"]
    store = features.Store.open(tmp_path / "f")
    assert store.meta["feature_dim"] == backbones.feature_dim(sp, alpha)
    assert store.meta["input_size_source"] == "given"
    if alpha is None or alpha == 1.0:
        assert store.meta["feature_dim"] == sp.feature_dim
    result = trainer.train(tmp_path / "f", tmp_path / "runs", HeadRecipe(epochs=3, patience=3, refit=False))
    assert result.epochs_run == 3
    config = zipfile.ZipFile(tmp_path / "runs" / "latest" / "model.keras").read("config.json").decode()
    modules = set(re.findall(r'"module": "([^"]+)"', config))
    assert modules and all(m.startswith("keras") for m in modules), modules  # Keras' own layers: no tlcli needed
    assert '"registered_name": "tlcli' not in config


@pytest.mark.parametrize("name", OTHERS)
def test_family_member_builds_and_gives_its_features(name):
    """A family's bigger members: registry entry against the built graph, and one eager forward pass.

    extract and train-head run the same code for them as for the family's smallest member above; what
    is their own is the spec (size, preprocessing, feature width, parameters), checked here without
    tracing a graph or saving up to 1.4 GB of random weights.
    """
    sp = backbones.SPECS[name]
    size, _ = _size_and_alpha(name)
    built = backbones.build(name, size=size, weights="none")
    assert built.model.count_params() == sp.params
    pixels = np.stack([np.full((size, size, 3), c, np.float32) for c in (30.0, 220.0)])
    vectors = np.asarray(features_model(built)(pixels))
    assert vectors.shape == (2, sp.feature_dim) and np.isfinite(vectors).all()


def test_registry_param_counts_match_keras():
    built = backbones.build("mobilenetv3small", size=32, weights="none")
    assert built.model.count_params() == backbones.SPECS["mobilenetv3small"].params
    assert built.key == "mobilenetv3small-a1-32-none"


@pytest.mark.parametrize("name", families(SMALLEST))
def test_static_table_matches_keras(name, monkeypatch):
    """What `tlcli backbones` prints from the registry without Keras: input size, feature width, parameters.

    Width and parameters are the headless network's at the default alpha; the input size is the default
    size Keras resolves the input against (MobileNetV3 takes any size and names none).
    """
    from keras.src.applications import imagenet_utils

    resolve, sizes = imagenet_utils.obtain_input_shape, []

    def recording(*args, **kwargs):
        sizes.append(kwargs["default_size"])
        return resolve(*args, **kwargs)

    monkeypatch.setattr(imagenet_utils, "obtain_input_shape", recording)
    sp = backbones.SPECS[name]
    built = backbones.build(name, size=_size_and_alpha(name)[0], weights="none")
    assert (built.model.output_shape[-1], built.model.count_params()) == (sp.feature_dim, sp.params)
    assert sizes == ([] if sp.family == "MobileNetV3" else [sp.size])


@pytest.mark.parametrize("name,hint", [("resnet", "resnet50"), ("VGG-16", None), ("efficientnet_b0", None)])
def test_names_are_forgiving_and_errors_suggest(name, hint):
    if hint:
        with pytest.raises(UsageError, match=hint):
            backbones.spec(name)
    else:
        assert backbones.spec(name).name in backbones.SPECS


def test_too_small_input_is_a_usage_error():
    with pytest.raises(UsageError, match="at least 75"):
        backbones.build("inceptionv3", size=64, weights="none")


@pytest.mark.parametrize("name", families(["mobilenet", "resnet50", "efficientnetb0", "densenet121"]))
def test_inference_graph_with_folded_batch_norms_matches_keras(name):
    """Conv -> batch norm pairs folded into constants: same outputs as the Keras model, to float rounding."""
    import keras
    import tensorflow as tf

    model = features_model(backbones.build(name, size=32, weights="none"), n_views=2)
    rng = np.random.default_rng(0)
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in norms:
        for v in (bn.moving_mean, bn.beta):
            v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
        for v in (bn.gamma, bn.moving_variance):
            v.assign(rng.uniform(0.8, 1.2, v.shape).astype("float32"))
    values = {id(v): v.numpy() for v in model.variables}
    graph._fold_batch_norms(model, values)
    assert any(not values[id(bn.moving_mean)].any() for bn in norms), "no batch norm was folded"
    pixels = rng.integers(0, 256, (4, 2, 32, 32, 3), dtype=np.uint8)
    expected = model([tf.cast(pixels[:, i], tf.float32) for i in range(2)], training=False).numpy()
    got = graph.inference_function(model, (2, 32, 32, 3))(pixels).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_extract_default_size_is_the_measured_one_else_imagenets():
    from tlcli.train.recipes import input_size

    assert input_size("mobilenet", 0.25, None, 224) == (320, "measured")
    assert input_size("mobilenet", 1.0, None, 224) == (224, "imagenet")
    assert input_size("efficientnetv2b0", None, None, 224) == (224, "imagenet")
    assert input_size("mobilenet", 0.25, 96, 224) == (96, "given")
