"""extract --shard I/N + --merge-shards equals one unsharded extract; --precision on real photos."""

from __future__ import annotations

import json
import os
import random
import shutil
import time

import numpy as np
import pytest

from tlcli.store import features, shards

from .conftest import lock_held, make_photo

TINY = ("--weights", "none", "--alpha", "0.25", "--size", "64", "--resize", "crop", "--quiet")


def _extract(cli, data, out, *extra):
    result = cli("extract", data, "--out", out, *TINY, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _merge(cli, data, out, *extra):
    return cli("extract", data, "--out", out, "--merge-shards", "--json", "--quiet", *extra)


def _store(path):
    meta = json.loads((path / "meta.json").read_text())
    store = features.Store.open(path)
    return meta, {name: store.arrays(name) for name in ("train", "val", "test")}


def _one_error_line(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def test_assignment_depends_only_on_the_path():
    files = [f"c{i % 3}/img_{i}.jpg" for i in range(2000)]
    owner = {f: shards.index_of(f, 8) for f in files}
    shuffled = random.Random(1).sample(files, len(files))
    assert {f: shards.index_of(f, 8) for f in shuffled} == owner
    assert set(owner.values()) == set(range(1, 9))
    sizes = np.bincount(list(owner.values()))[1:]
    assert sizes.min() > 0.8 * 250 and sizes.max() < 1.2 * 250, sizes
    assert shards.parse("3/8") == (3, 8) and shards.parse(" 8 / 8 ") == (8, 8)


def test_four_shards_merged_equal_the_unsharded_store(cli, colour_dataset, tmp_path):
    (colour_dataset / "red" / "broken.jpg").write_text("not an image")
    whole = _extract(cli, colour_dataset, tmp_path / "whole")
    out = tmp_path / "sharded"
    parts = [_extract(cli, colour_dataset, out, "--shard", f"{i}/4") for i in range(1, 5)]
    assert sum(p["images"] for p in parts) == 25 and all(p["extracted"] == p["stored"] for p in parts)
    assert {p["out"] for p in parts} == {str(out / "shards" / f"{i}-of-4") for i in range(1, 5)}
    assert not (out / "meta.json").exists()

    merged = _merge(cli, colour_dataset, out)
    assert merged.exit_code == 0, merged.output
    doc = json.loads(merged.stdout)
    assert doc["merged"] == 4 and doc["stored"] == whole["stored"] == 24 and doc["splits"] == whole["splits"]
    assert [s["path"] for s in doc["skipped"]] == ["red/broken.jpg"]
    meta_m, split_m = _store(out)
    meta_w, split_w = _store(tmp_path / "whole")
    assert list(meta_m) == list(meta_w)
    assert {k for k in meta_m if meta_m[k] != meta_w[k]} <= {"shards", "written", "extractor"}
    assert (out / meta_m["extractor"]["file"]).is_file()  # the traced graph travels, so re-runs skip the build
    assert (meta_m["shards"], meta_w["shards"]) == (4, 1)
    for name in ("train", "val", "test"):
        m, w = split_m[name], split_w[name]
        assert sorted(m) == sorted(w)
        for column in ("paths", "labels", "hashes", "sizes", "mtimes"):
            assert m[column].tolist() == w[column].tolist(), (name, column)
        np.testing.assert_allclose(m["features"], w["features"], rtol=1e-5, atol=1e-6)

    trained = cli("train-head", out, "--out", tmp_path / "runs", "--json", "--quiet")
    assert trained.exit_code == 0, trained.output
    run_meta = json.loads((tmp_path / "runs" / "latest" / "meta.json").read_text())
    assert run_meta["counts"] == whole["splits"] and run_meta["features_key"] == whole["key"]
    again = _extract(cli, colour_dataset, out)
    assert again["extracted"] == 0 and again["reused"] == 24

    make_photo(colour_dataset / "blue" / "late.jpg", (30, 30, 210), seed=55)
    owner = shards.index_of("blue/late.jpg", 4)
    stale = _merge(cli, colour_dataset, out)
    _one_error_line(stale, "added, removed or renamed", "every shard", "--shard 1/4")
    rerun = [_extract(cli, colour_dataset, out, "--shard", f"{i}/4") for i in range(1, 5)]
    assert [r["extracted"] for r in rerun] == [int(i + 1 == owner) for i in range(4)]
    assert json.loads(_merge(cli, colour_dataset, out).stdout)["stored"] == 25
    assert "blue/late.jpg" in [p for split in _store(out)[1].values() for p in split["paths"].tolist()]
    shutil.rmtree(out / "shards" / "2-of-4")
    assert _extract(cli, colour_dataset, out, "--shard", "2/4")["extracted"] == 0  # reused from the merged store


@pytest.mark.parametrize("bad", ["0/4", "5/4", "x", "3", "-1/4", "1/0"])
def test_bad_shard_exits_2_with_one_line(cli, colour_dataset, tmp_path, bad):
    result = cli("extract", colour_dataset, "--out", tmp_path / "f", *TINY, "--shard", bad)
    _one_error_line(result, f"--shard {bad!r}", "I/N")
    assert not (tmp_path / "f").exists()


def test_merge_refuses_missing_and_mismatched_parts(cli, colour_dataset, tmp_path):
    out = tmp_path / "f"
    _one_error_line(_merge(cli, colour_dataset, out), "holds no shard parts", "--shard I/N")
    for i in (1, 2, 4):
        _extract(cli, colour_dataset, out, "--shard", f"{i}/4", "--seed", "3")
    line = _one_error_line(_merge(cli, colour_dataset, out), "shard 3/4 missing")
    assert "--size 64 --resize crop --weights none --seed 3 --shard 3/4" in line
    _extract(cli, colour_dataset, out, "--shard", "3/4", "--seed", "3", "--size", "72")
    _one_error_line(_merge(cli, colour_dataset, out), "shard 3/4 has features", "-72-", "but shard 1/4 has")
    _extract(cli, colour_dataset, out, "--shard", "3/4", "--seed", "3")
    _one_error_line(_merge(cli, colour_dataset, out, "--backbone", "resnet50"), "--backbone mobilenet, not resnet50")
    _one_error_line(_merge(cli, colour_dataset, out, "--seed", "0"), "--seed 3, not 0")
    _one_error_line(_merge(cli, colour_dataset, tmp_path / "f", "--shard", "1/4"), "give one of them")
    other = tmp_path / "copy"
    shutil.copytree(colour_dataset, other)
    _one_error_line(_merge(cli, other, out), f"extracted from {colour_dataset.resolve()}")
    _extract(cli, colour_dataset, out, "--shard", "1/2", "--seed", "3")
    _one_error_line(_merge(cli, colour_dataset, out), "parts for 2 and 4 shards")
    shutil.rmtree(out / "shards" / "1-of-2")
    assert _merge(cli, colour_dataset, out, "--seed", "3", "--size", "64").exit_code == 0


def test_workers_lock_only_their_own_part(cli, colour_dataset, tmp_path):
    out = tmp_path / "f"
    (out / "shards" / "1-of-2").mkdir(parents=True)
    with lock_held(out / "shards" / "1-of-2" / ".tlcli.lock") as holder:
        busy = cli("extract", colour_dataset, "--out", out, *TINY, "--shard", "1/2")
        _one_error_line(busy, f"(pid {holder.pid}")
        _extract(cli, colour_dataset, out, "--shard", "2/2")
        with lock_held(out / ".tlcli.lock"):
            _extract(cli, colour_dataset, out, "--shard", "2/2")  # a merge holding OUT does not stop the workers
        _one_error_line(_merge(cli, colour_dataset, out), f"(pid {holder.pid}", "1-of-2")
    _extract(cli, colour_dataset, out, "--shard", "1/2")
    assert _merge(cli, colour_dataset, out).exit_code == 0


def test_each_precision_gets_its_own_store_key(cli, colour_dataset, tmp_path):
    _skip_where_onednn_cannot_run_bfloat16()
    out = tmp_path / "f"
    previous = _extract(cli, colour_dataset, out)
    plain_key = previous["key"]
    for precision in ("mixed_bfloat16", "mixed_float16", "float32"):
        now = _extract(cli, colour_dataset, out, "--precision", precision)
        mixed = f"-{precision}" if precision != "float32" else ""
        assert now["key"] == f"{plain_key.removesuffix('-crop')}{mixed}-crop" and now["precision"] == precision
        assert now["replaced_key"] == previous["key"] and now["extracted"] == 24
        meta, splits = _store(out)
        assert meta["precision"] == precision and splits["train"]["features"].dtype == np.float32
        assert np.isfinite(splits["train"]["features"]).all()
        previous = now
    bad = cli("extract", colour_dataset, "--out", out, *TINY, "--precision", "float8")
    _one_error_line(bad, "--precision 'float8'", "mixed_bfloat16")


SIZE = "144"  # not one of MobileNet's native sizes, so Keras loads the offline 224 weights
HEAD_SEEDS = (0, 1, 2)
# Bars of test_bfloat16_features_and_heads_match_float32, each set outside what was measured (its docstring).
MEAN_ERROR, MAX_ERROR = 0.14, 0.40  # relative L2 error of a bfloat16 vector: mean and worst over 1,002 photos
AGREEMENT = 0.94  # a float32 head predicts the same class from bfloat16 as from float32 vectors, per seed
SWAP_LOSS = 0.015  # ... and its held-out accuracy (mean over seeds) drops by at most this from bfloat16 vectors
TRAINING_COST = 0.03  # a head trained on bfloat16 vectors loses at most this much held-out accuracy (mean)
BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI")


def _skip_where_onednn_cannot_run_bfloat16():
    """TensorFlow hands bfloat16 convolutions to oneDNN whenever the CPU has AVX-512 (else to its own
    kernels); ONEDNN_MAX_CPU_ISA=AVX2 on such a CPU leaves oneDNN without a bfloat16 convolution, so the
    extract aborts. A real AVX2-only CPU takes TensorFlow's kernels, as TF_ENABLE_ONEDNN_OPTS=0 does."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa in BELOW_AVX512 and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
        pytest.skip(f"ONEDNN_MAX_CPU_ISA={isa} emulates a CPU whose bfloat16 path TensorFlow would not take")


@pytest.mark.slow
def test_bfloat16_features_and_heads_match_float32(cli, keras_home, shared_data, tmp_path, record_property):
    """All 1,002 cats_vs_dogs photos extracted both ways (144 px, centre crop); split.json: the first 120
    and next 15 photos of each class train and validate the heads, the other 732 are held out.

    What is promised, each measured so that head-training noise (early stopping on 30 val photos: one
    seed stopped at 78 epochs on float32 vectors, 244 on bfloat16 ones) does not decide it:
    - vectors: relative L2 error of a bfloat16 vector against the float32 one is bounded;
    - inference, paired (nothing retrained): each float32-trained head, fed the held-out photos'
      bfloat16 instead of float32 vectors, predicts the same class for nearly every photo and is no
      less accurate;
    - training: heads trained on bfloat16 vectors, in the float32 model train-head saves, lose at most
      TRAINING_COST of held-out accuracy against float32-trained heads of the same seeds (mean of 3).

    Measured, seeds 0-9, as default ISA (AVX512-BF16; ONEDNN_MAX_CPU_ISA=AVX512_CORE gave the same
    figures to the last digit) / TF_ENABLE_ONEDNN_OPTS=0 (TensorFlow's own kernels, which a CPU without
    AVX-512 gets for bfloat16):
    - error mean 0.090 / 0.107, worst 0.221 / 0.282 (bars 0.14 and 0.40: margins 3.3 and 12 points);
    - agreement 0.969-0.989 / 0.967-0.986 (bar 0.94: margin 2.7 points, 20 photos); accuracy from
      bfloat16 vectors minus float32 ones per seed -0.001..+0.016 / -0.001..+0.019, never below +0.001
      as a mean of 3 seeds (bar -0.015: margin 1.6 points);
    - cost per seed -0.008..+0.012 / -0.006..+0.022, mean 0.005 / 0.006; mean of 3 consecutive seeds
      at most 0.009 / 0.007 (bar 0.03: margin 2 points). With 300 other training photos (the previous
      version of this test) it was 0.009 to 0.014 as a mean of seeds 0-2, on this and on issue 20's CPU.
    ONEDNN_MAX_CPU_ISA=AVX2 is skipped (see _skip_where_onednn_cannot_run_bfloat16).
    """
    _skip_where_onednn_cannot_run_bfloat16()
    data = tmp_path / "photos"
    assignment = {"train": [], "val": [], "test": []}
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        for i, photo in enumerate(sorted((shared_data / "cats_vs_dogs" / cls).glob("*.jpg"))):
            shutil.copy(photo, data / cls / photo.name)
            assignment["train" if i < 120 else "val" if i < 135 else "test"].append(f"{cls}/{photo.name}")
    (data / "split.json").write_text(json.dumps(assignment))
    from tlcli.models.run import load_run

    common = ("--alpha", "0.25", "--size", SIZE, "--resize", "crop", "--json", "--quiet")
    vectors, held_out, heads, seconds = {}, {}, {}, {}
    for precision in ("float32", "mixed_bfloat16"):
        store = tmp_path / precision
        started = time.perf_counter()
        extracted = cli("extract", data, "--out", store, "--precision", precision, *common)
        seconds[precision] = round(time.perf_counter() - started, 2)
        assert extracted.exit_code == 0, extracted.output
        _, splits = _store(store)
        assert splits["test"]["paths"].tolist() == sorted(assignment["test"])
        vectors[precision] = np.concatenate([splits[s]["features"] for s in ("train", "val", "test")])
        held_out[precision] = splits["test"]["features"]
        labels = splits["test"]["labels"]
        for seed in HEAD_SEEDS:
            runs = tmp_path / f"runs-{precision}-{seed}"
            trained = cli("train-head", store, "--out", runs, "--seed", seed, "--json", "--quiet")
            assert trained.exit_code == 0, trained.output
            model, meta, _ = load_run(runs / "latest")
            heads[precision, seed] = model.get_layer("views").get_layer("head")
    exact, mixed = vectors["float32"], vectors["mixed_bfloat16"]
    relative = np.linalg.norm(mixed - exact, axis=1) / np.linalg.norm(exact, axis=1)

    def predicted(head_precision, seed, features_precision):
        return np.asarray(heads[head_precision, seed](held_out[features_precision])).argmax(1)

    # accuracy of the float32 model: heads trained on either precision, fed float32 vectors
    accuracy = {p: [float(np.mean(predicted(p, s, "float32") == labels)) for s in HEAD_SEEDS] for p in vectors}
    swapped = [float(np.mean(predicted("float32", s, "mixed_bfloat16") == labels)) for s in HEAD_SEEDS]
    agreement = [
        float(np.mean(predicted("float32", s, "float32") == predicted("float32", s, "mixed_bfloat16")))
        for s in HEAD_SEEDS
    ]
    cost = float(np.mean(accuracy["float32"]) - np.mean(accuracy["mixed_bfloat16"]))
    record_property(
        "measured",
        f"bfloat16 vs float32 on {len(relative)} photos: relative L2 error per vector mean {relative.mean():.4f} "
        f"max {relative.max():.4f}; on {len(labels)} held-out photos, float32 heads fed float32/bfloat16 vectors "
        f"{accuracy['float32']} / {swapped}, agreement {agreement}; heads trained on bfloat16 vectors "
        f"{accuracy['mixed_bfloat16']}, mean cost {cost:+.4f}; extract seconds {seconds}",
    )
    assert relative.mean() < MEAN_ERROR and relative.max() < MAX_ERROR, relative
    assert min(agreement) >= AGREEMENT, agreement
    assert np.mean(swapped) >= np.mean(accuracy["float32"]) - SWAP_LOSS, (swapped, accuracy)
    assert cost <= TRAINING_COST, accuracy

    # the last run loaded was trained on bfloat16 vectors; it saves a float32 model
    assert meta["features_key"].endswith("-mixed_bfloat16-crop") and model.outputs[0].dtype == "float32"

    def policies(layer) -> set[str]:
        return {layer.dtype_policy.name}.union(*(policies(inner) for inner in getattr(layer, "layers", [])))

    assert policies(model) == {"float32"}
