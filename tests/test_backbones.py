"""Every registered backbone builds, extracts and trains a head (random weights, small inputs)."""

from __future__ import annotations

import numpy as np
import pytest

from tlcli import backbones, features, head, images
from tlcli.errors import UsageError

from .conftest import make_photo

HEAVY = {
    "convnextlarge",
    "convnextxlarge",
    "efficientnetb7",
    "efficientnetv2l",
    "efficientnetv2m",
    "resnet152",
    "resnet152v2",
    "efficientnetb6",
    "convnextbase",
    "inceptionresnetv2",
}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for i in range(4):
        make_photo(root / "red" / f"r{i}.png", (220, 30, 30), size=(24, 20), seed=i, fmt="PNG")
        make_photo(root / "blue" / f"b{i}.png", (30, 30, 220), size=(24, 20), seed=10 + i, fmt="PNG")
    return root


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in backbones.SPECS]
)
def test_backbone_builds_extracts_and_trains(name, tiny_dataset, tmp_path):
    sp = backbones.SPECS[name]
    size = sp.size if sp.fixed_size else max(sp.min_size, 32)
    alpha = sp.alphas[0] if sp.alphas else None
    summary = features.extract(
        tiny_dataset,
        tmp_path / "f",
        backbone=name,
        alpha=alpha,
        size=size,
        weights="none",
        fractions=(0.5, 0.25, 0.25),
        batch_size=8,
        resize="crop",
    )
    assert summary["stored"] == 8 and not summary["skipped"]
    store = features.Store.open(tmp_path / "f")
    assert store.meta["feature_dim"] == backbones.feature_dim(sp, alpha)
    if alpha is None or alpha == 1.0:
        assert store.meta["feature_dim"] == sp.feature_dim
    result = head.train(tmp_path / "f", tmp_path / "runs", epochs=3, patience=3)
    assert (tmp_path / "runs" / "latest" / "model.keras").is_file()
    assert result["epochs_run"] == 3


def test_registry_param_counts_match_keras():
    built = backbones.build("mobilenetv3small", size=32, weights="none")
    assert built.model.count_params() == backbones.SPECS["mobilenetv3small"].params
    assert built.key == "mobilenetv3small-a1-32-none"


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


@pytest.mark.parametrize("name", ["mobilenet", "resnet50", "efficientnetb0", "densenet121"])
def test_inference_graph_with_folded_batch_norms_matches_keras(name):
    """Conv -> batch norm pairs folded into constants: same outputs as the Keras model, to float rounding."""
    import keras
    import tensorflow as tf

    from tlcli.layers import feature_model

    model = feature_model(backbones.build(name, size=32, weights="none"), flip_average=False, n_views=2)
    rng = np.random.default_rng(0)
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in norms:
        for v in (bn.moving_mean, bn.beta):
            v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
        for v in (bn.gamma, bn.moving_variance):
            v.assign(rng.uniform(0.8, 1.2, v.shape).astype("float32"))
    values = {id(v): v.numpy() for v in model.variables}
    images._fold_batch_norms(model, values)
    assert any(not values[id(bn.moving_mean)].any() for bn in norms), "no batch norm was folded"
    pixels = rng.integers(0, 256, (4, 2, 32, 32, 3), dtype=np.uint8)
    expected = model(tf.cast(pixels, tf.float32), training=False).numpy()
    got = images.inference_function(model, (2, 32, 32, 3))(pixels).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
