"""extract --shard I/N + --merge-shards equals one unsharded extract; --precision on real photos."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time

import numpy as np
import pytest

from tlcli.store import shards

from .conftest import make_photo

TINY = ("--weights", "none", "--alpha", "0.25", "--size", "64", "--resize", "crop", "--quiet")


def _extract(cli, data, out, *extra):
    result = cli("extract", data, "--out", out, *TINY, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _merge(cli, data, out, *extra):
    return cli("extract", data, "--out", out, "--merge-shards", "--json", "--quiet", *extra)


def _store(path):
    meta = json.loads((path / "meta.json").read_text())
    splits = {}
    for name in ("train", "val", "test"):
        with np.load(path / meta["splits"][name]["file"]) as z:
            splits[name] = {k: z[k] for k in z.files}
    return meta, splits


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
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / "shards" / "1-of-2" / ".tlcli.lock").write_text(f"{holder.pid}\n")
        busy = cli("extract", colour_dataset, "--out", out, *TINY, "--shard", "1/2")
        _one_error_line(busy, f"(pid {holder.pid}")
        _extract(cli, colour_dataset, out, "--shard", "2/2")
        (out / ".tlcli.lock").write_text(f"{os.getpid()}\n")
        _extract(cli, colour_dataset, out, "--shard", "2/2")  # a merge holding OUT does not stop the workers
        (out / ".tlcli.lock").unlink()
        _one_error_line(_merge(cli, colour_dataset, out), f"(pid {holder.pid}", "1-of-2")
    finally:
        holder.kill()
        holder.wait()
    _extract(cli, colour_dataset, out, "--shard", "1/2")
    assert _merge(cli, colour_dataset, out).exit_code == 0


def test_each_precision_gets_its_own_store_key(cli, colour_dataset, tmp_path):
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


@pytest.mark.slow
def test_bfloat16_features_and_accuracy_match_float32(cli, keras_home, shared_data, tmp_path, capsys):
    """300 photos extracted both ways; heads (3 seeds each) evaluated on 400 other photos.

    One head's accuracy moves by up to ~1.5 points when its training features change slightly
    (early stopping on 30 validation photos picks another epoch), so the bar is on the mean over seeds.
    """
    train, held_out = tmp_path / "train", tmp_path / "held_out"
    for cls in ("cat", "dog"):
        photos = sorted((shared_data / "cats_vs_dogs" / cls).glob("*.jpg"))
        for folder, chosen in ((train, photos[:150]), (held_out, photos[150:350])):
            (folder / cls).mkdir(parents=True)
            for photo in chosen:
                shutil.copy(photo, folder / cls / photo.name)
    vectors, accuracy, seconds = {}, {}, {}
    for precision in ("float32", "mixed_bfloat16"):
        store = tmp_path / precision
        started = time.perf_counter()
        common = ("--alpha", "0.25", "--size", SIZE, "--resize", "crop", "--json", "--quiet")
        extracted = cli("extract", train, "--out", store, "--precision", precision, *common)
        seconds[precision] = round(time.perf_counter() - started, 2)
        assert extracted.exit_code == 0, extracted.output
        _, splits = _store(store)
        vectors[precision] = {
            p: v for split in splits.values() for p, v in zip(split["paths"].tolist(), split["features"], strict=True)
        }
        accuracy[precision] = []
        for seed in HEAD_SEEDS:
            runs = tmp_path / f"runs-{precision}-{seed}"
            trained = cli("train-head", store, "--out", runs, "--seed", seed, "--json", "--quiet")
            assert trained.exit_code == 0, trained.output
            evaluated = cli("evaluate", runs / "latest", held_out, "--json", "--quiet")
            assert evaluated.exit_code == 0, evaluated.output
            accuracy[precision].append(json.loads(evaluated.stdout)["accuracy"])
    paths = sorted(vectors["float32"])
    assert len(paths) == 300 and sorted(vectors["mixed_bfloat16"]) == paths
    exact = np.stack([vectors["float32"][p] for p in paths])
    mixed = np.stack([vectors["mixed_bfloat16"][p] for p in paths])
    relative = np.linalg.norm(mixed - exact, axis=1) / np.linalg.norm(exact, axis=1)
    mean = {k: float(np.mean(v)) for k, v in accuracy.items()}
    with capsys.disabled():
        print(
            f"\nbfloat16 vs float32 on {len(paths)} photos: relative L2 error per vector mean {relative.mean():.4f} "
            f"max {relative.max():.4f}; held-out accuracy {accuracy} (means {mean}); extract seconds {seconds}"
        )
    assert relative.mean() < 0.12 and relative.max() < 0.35
    assert abs(mean["mixed_bfloat16"] - mean["float32"]) <= 0.01
    from tlcli.models.run import load_run

    model, meta, _ = load_run(tmp_path / "runs-mixed_bfloat16-0" / "latest")
    assert meta["features_key"].endswith("-mixed_bfloat16-crop") and model.outputs[0].dtype == "float32"

    def policies(layer) -> set[str]:
        return {layer.dtype_policy.name}.union(*(policies(inner) for inner in getattr(layer, "layers", [])))

    assert policies(model) == {"float32"}
