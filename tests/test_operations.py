"""Operations: `tlcli run` pipelines, run history and pruning, locks between processes, signals, faults, seeds."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlcli.store import files
from tlcli.store.features import Store
from tlcli.store.locks import LOCK_NAME

from .conftest import make_photo

CONFIG = """
[extract]
data_dir = "data/colours"
out = "features/colours"
weights = "{weights}"
alpha = 0.25
size = {size}
resize = "crop"

[train-head]
out = "runs/colours"
epochs = 80
patience = 20

[evaluate]
{evaluate}
"""


def make_project(root: Path, n: int = 16, weights: str = "none", size: int = 64, evaluate: str = "") -> Path:
    """A project folder with two colour classes and configs/colours.toml, as a user would lay it out."""
    for i in range(n):
        make_photo(root / "data" / "colours" / "red" / f"r{i}.jpg", (200, 40, 40), seed=i)
        make_photo(root / "data" / "colours" / "blue" / f"b{i}.jpg", (40, 40, 200), seed=500 + i)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    config = root / "configs" / "colours.toml"
    config.write_text(CONFIG.format(weights=weights, size=size, evaluate=evaluate))
    return config


def add_photos(root: Path, k: int, start: int) -> None:
    for i in range(start, start + k):
        cls, colour = (("red", (200, 40, 40)), ("blue", (40, 40, 200)))[i % 2]
        make_photo(root / "data" / "colours" / cls / f"new{i}.jpg", colour, seed=1000 + i)


def _as_in_a_terminal() -> None:
    """Children of a backgrounded test run inherit an ignored SIGINT; a user's Ctrl-C is not ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tlcli(*args, cwd: Path, **kw) -> subprocess.Popen:
    """Start the real console entry point (python -m tlcli) in a child process."""
    return subprocess.Popen(
        [sys.executable, "-m", "tlcli", *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_in_a_terminal,
        **kw,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"process ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def leftovers(*folders: Path) -> list[str]:
    """Temp files and staging folders a writer would leave if it were not atomic."""
    found = []
    for folder in folders:
        if folder.is_dir():
            found += [
                p.name for p in folder.iterdir() if p.name.startswith((".staging-", ".pruned-")) or ".tmp" in p.name
            ]
    return found


def is_png(path: Path) -> bool:
    with Image.open(path) as im:
        im.load()
        return im.format == "PNG" and im.size[0] > 100


def test_run_pipeline_records_history_and_promotes_only_if_better(cli, tmp_path, monkeypatch):
    config = make_project(tmp_path, evaluate="min_accuracy = 0.0")
    monkeypatch.chdir(tmp_path)
    first = cli("run", config, "--promote-if-better", "--json")
    assert first.exit_code == 0, first.stderr
    assert first.stdout.count("\n") == 1, "one line, for a cron job's log"
    doc = json.loads(first.stdout)
    assert [s["step"] for s in doc["steps"]] == ["extract", "train-head", "evaluate", "promote"]
    assert doc["promoted"] and doc["extracted"] == 32
    run = Path(doc["run"])
    assert (tmp_path / "runs" / "colours" / "latest").resolve() == run
    assert is_png(run / "curves.png") and is_png(run / "confusion.png")
    assert (run / "report.html").is_file() and (run / "evaluations" / "test" / "report.html").is_file()
    log = (run / "train.log").read_text()
    assert "epoch 1:" in log and "refit on train+val" in log
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config"]["tables"]["extract"]["size"] == 64 and len(meta["config"]["sha256"]) == 64
    assert meta["split_hash"] and meta["weights"] == "none" and meta["versions"]["tensorflow"]
    assert meta["evaluation"]["accuracy"] == doc["accuracy"] and meta["promoted"] is True
    assert json.loads((run / "pipeline.json").read_text())["promoted"] is True

    add_photos(tmp_path, 2, 0)
    second = cli("run", config, "--promote-if-better", "--json")
    doc2 = json.loads(second.stdout)
    assert doc2["extracted"] == 2, "only the new photos are extracted"
    better = doc2["steps"][1]["did"]
    assert second.exit_code == (0 if doc2["promoted"] else 3), better
    history = json.loads(cli("runs", "runs/colours", "--json").stdout)["runs"]
    assert [r["run"] for r in history] == [run.name, Path(doc2["run"]).name]
    assert [r["latest"] for r in history] == ([False, True] if doc2["promoted"] else [True, False])
    assert history[1]["counts"]["train"] + history[1]["counts"]["val"] + history[1]["counts"]["test"] == 34
    table = cli("runs", "runs/colours")
    assert table.exit_code == 0 and run.name in table.stdout and "latest" in table.stdout


def test_run_gate_keeps_latest_when_accuracy_is_below_min(cli, tmp_path, monkeypatch):
    config = make_project(tmp_path, evaluate="min_accuracy = 0.0")
    monkeypatch.chdir(tmp_path)
    assert cli("run", config).exit_code == 0
    latest = (tmp_path / "runs" / "colours" / "latest").resolve()
    config.write_text(config.read_text().replace("min_accuracy = 0.0", "min_accuracy = 1.0\ndata_dir = 'hard'"))
    make_photo(tmp_path / "hard" / "red" / "x.jpg", (40, 40, 200), seed=1)  # a blue photo labelled red
    make_photo(tmp_path / "hard" / "blue" / "y.jpg", (40, 40, 200), seed=2)
    result = cli("run", config, "--json")
    assert result.exit_code == 3
    doc = json.loads(result.stdout)
    assert not doc["promoted"] and "below min_accuracy 1.0" in doc["reason"]
    assert (tmp_path / "runs" / "colours" / "latest").resolve() == latest
    assert json.loads((Path(doc["run"]) / "meta.json").read_text())["promoted"] is False


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train-head]\nout = 'r'\n", "has no [extract] table"),
        ("[extract]\ndata_dir = 'd'\n[train-head]\n[nonsense]\n", "unknown table(s) [nonsense]"),
        ("[extract]\ndata_dir = 'd'\n[train-head]\nepochs = 0\n", "[train-head]: Invalid value for '--epochs'"),
        ("[extract]\ndata_dir = 'd'\nbackbone_typo = 1\n[train-head]\n", "unknown option(s) backbone_typo"),
        ("[extract\n", "is not valid TOML"),
    ],
)
def test_run_config_errors_are_one_line(cli, tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = cli("run", config)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_keep_prunes_only_never_promoted_runs(cli, tmp_path, colour_run):
    runs = tmp_path / "runs"
    store = colour_run.features  # the session's store (conftest.colour_run): train-head only reads it
    codes = [cli("train-head", store, "--out", runs, "--promote-if-better", "-q").exit_code for _ in range(4)]
    assert codes == [0, 3, 3, 3], "same features and seed: the later runs are not better"
    names = [r["run"] for r in json.loads(cli("runs", runs, "--json").stdout)["runs"]]
    pruned = json.loads(cli("runs", runs, "--keep", "1", "--json").stdout)
    assert pruned["pruned"] == names[1:3]
    assert [r["run"] for r in pruned["runs"]] == [names[0], names[3]]
    assert pruned["runs"][0]["latest"] and (runs / "latest" / "model.keras").is_file()
    assert cli("runs", runs, "--keep", "0").exit_code == 2


def test_same_seed_same_metrics_and_tensorboard(cli, tmp_path, colour_run):
    import tensorflow as tf

    def train(seed: int, *extra) -> Path:
        out = tmp_path / f"runs{seed}"
        result = cli("train-head", colour_run.features, "--out", out, "--seed", seed, "--json", *extra)
        assert result.exit_code == 0, result.stderr
        return Path(json.loads(result.stdout)["run"])

    a = train(0, "--tensorboard", tmp_path / "tb")
    b = train(0)
    assert (a / "metrics.json").read_text() == (b / "metrics.json").read_text()
    assert (a / "history.json").read_text() == (b / "history.json").read_text()
    c = train(1)
    assert json.loads((c / "metrics.json").read_text())["accuracy"] == 1.0, "another seed still learns the colours"
    assert cli("evaluate", c, "--min-accuracy", "0.9", "-q").exit_code == 0

    assert [p.name for p in (tmp_path / "tb").iterdir()] == [a.name], "the TensorBoard folder is the run's name"
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    tags = set()
    for record in tf.data.TFRecordDataset([str(e) for e in events]):
        event = tf.compat.v1.Event.FromString(record.numpy())
        tags |= {v.tag for v in event.summary.value}
    epochs = len(json.loads((a / "history.json").read_text())["loss"])
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= tags and epochs > 1


def test_full_disk_leaves_no_partial_run(cli, tmp_path, colour_run, monkeypatch):
    runs = colour_run.copy_runs(tmp_path / "runs")  # a promoted run to keep
    before = sorted(p.name for p in runs.iterdir())
    latest = (runs / "latest").resolve()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    result = cli("train-head", colour_run.features, "--out", runs, "-q")
    monkeypatch.undo()
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert f"({runs}/" in result.stderr  # the folder of the full disk, as os.fsync does not name one
    assert sorted(p.name for p in runs.iterdir()) == before and (runs / "latest").resolve() == latest
    assert leftovers(runs) == []


@pytest.fixture(scope="module")
def colour_project(tmp_path_factory) -> Path:
    """A project whose first `tlcli run` has completed: a promoted latest and a feature store."""
    root = tmp_path_factory.mktemp("ops")
    config = make_project(root, n=24)
    proc = tlcli("run", config, "--json", cwd=root)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return root


def snapshot(root: Path) -> dict:
    """What must survive any crash: latest's target and predictions, and the readable feature store."""
    from tlcli.models.run import load_run

    model, meta, run_dir = load_run(root / "runs" / "colours" / "latest")
    test = [root / "data" / "colours" / p for p, _ in meta["test_files"]]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64))) for p in test]).astype(np.float32)
    store = Store.open(root / "features" / "colours")
    n = sum(len(store.split(s).labels) for s in ("train", "val", "test"))
    return {"run": run_dir, "probs": model.predict(pixels, verbose=0), "stored": n}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_with_130(colour_project, sig):
    root = colour_project
    before = snapshot(root)
    add_photos(root, 2, 100 + sig)
    proc = tlcli("run", "configs/colours.toml", cwd=root)
    wait_for(root / "runs" / "colours" / LOCK_NAME, proc)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    after = snapshot(root)
    assert after["run"] == before["run"] and np.allclose(after["probs"], before["probs"])
    assert leftovers(root / "runs" / "colours", root / "features" / "colours") == []
    assert not (root / "runs" / "colours" / LOCK_NAME).exists()


def test_second_writer_gets_the_lock_message(colour_project):
    root = colour_project
    add_photos(root, 2, 200)
    on_disk = len(list((root / "data" / "colours").rglob("*.jpg")))
    not_stored = on_disk - snapshot(root)["stored"]
    first = tlcli("run", "configs/colours.toml", "--json", cwd=root)
    wait_for(root / "features" / "colours" / LOCK_NAME, first)
    wait_for(root / "runs" / "colours" / LOCK_NAME, first)
    first.send_signal(signal.SIGSTOP)  # a stopped holder is alive: without this the run can finish first
    try:
        second = tlcli("run", "configs/colours.toml", cwd=root)
        third = tlcli("train-head", "features/colours", "--out", "runs/colours", cwd=root)
        _, err2 = second.communicate(timeout=300)
        _, err3 = third.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode in (0, 3), err1
    assert second.returncode == 2 and third.returncode == 2
    assert "another tlcli run is writing" in err2 and f"(pid {first.pid}" in err2
    assert f"(pid {first.pid}" in err3 and "--wait" in err3
    assert json.loads(out1)["extracted"] == not_stored
    snapshot(root)


@pytest.mark.slow
def test_sigkill_at_many_points_never_breaks_latest_or_store(colour_project):
    """Kill `tlcli run` at points spread evenly over a whole run (start-up, extract, train-head, publish, evaluate,
    promote); after each, latest and the store still work."""
    root = colour_project
    runs, store = root / "runs" / "colours", root / "features" / "colours"
    start = time.monotonic()
    add_photos(root, 2, 300)
    proc = tlcli("run", "configs/colours.toml", cwd=root)
    proc.communicate(timeout=600)
    full = time.monotonic() - start
    points = [full * (i + 0.5) / 5 for i in range(5)]
    phases = {"before new features": 0, "features stored, no new run": 0, "new run published": 0}
    before = snapshot(root)
    for i, delay in enumerate(points):
        runs_before = {p.name for p in runs.iterdir()}
        add_photos(root, 2, 400 + 2 * i)
        proc = tlcli("run", "configs/colours.toml", cwd=root)
        time.sleep(delay)
        proc.kill()
        proc.communicate(timeout=60)
        after = snapshot(root)
        if after["run"] == before["run"]:
            assert np.allclose(after["probs"], before["probs"]), "the previous latest still predicts as before"
        new_runs = {p.name for p in runs.iterdir()} - runs_before - {LOCK_NAME}
        new_runs = {n for n in new_runs if not n.startswith(".")}
        if new_runs:
            phases["new run published"] += 1
        elif after["stored"] > before["stored"]:
            phases["features stored, no new run"] += 1
        else:
            phases["before new features"] += 1
        before = after
    print(f"SIGKILL points tried: {len(points)} over a {full:.1f}s run; {phases}")
    assert sum(v > 0 for v in phases.values()) >= 2, phases
    final = tlcli("run", "configs/colours.toml", "--json", cwd=root)
    out, err = final.communicate(timeout=600)
    assert final.returncode in (0, 3), err
    doc = json.loads(out)
    assert doc["steps"][0]["did"].startswith(f"{snapshot(root)['stored']} images")
    assert leftovers(runs, store) == []
    assert not (runs / LOCK_NAME).exists() and not (store / LOCK_NAME).exists()


@pytest.mark.slow
def test_cron_retraining_on_a_growing_folder(cli, keras_home, shared_data, tmp_path, monkeypatch):
    """Real photos: add 5% new images and run again; only those are extracted, the run is recorded.

    The evaluate step (and its min_accuracy gate) runs on 200 other photos, not on the 10 of the test
    split, where one photo is 10 points: there the first run scored exactly the old bar, 0.7. Measured
    on the 200, under the default ISA, ONEDNN_MAX_CPU_ISA=AVX2 and TF_ENABLE_ONEDNN_OPTS=0 alike: first
    run 0.895, second 0.905; bar 0.8 (margin 9.5 points, 19 photos).
    """
    src = shared_data / "cats_vs_dogs"
    for cls in ("cat", "dog"):
        files = sorted((src / cls).iterdir())
        for folder, chosen in (("colours", files[:50]), ("held_out", files[100:200])):
            (tmp_path / "data" / folder / cls).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (tmp_path / "data" / folder / cls / f.name).symlink_to(f)
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "pets.toml"
    gate = 'min_accuracy = 0.8\ndata_dir = "data/held_out"'
    config.write_text(CONFIG.format(weights="imagenet", size=224, evaluate=gate))
    monkeypatch.chdir(tmp_path)
    first = cli("run", config, "--promote-if-better", "--json")
    assert first.exit_code == 0, first.stderr
    assert first.stdout.count("\n") == 1, "one line, for a cron job's log"
    doc = json.loads(first.stdout)
    assert doc["extracted"] == 100 and doc["accuracy"] >= 0.8

    for cls in ("cat", "dog"):
        for f in sorted((src / cls).iterdir())[50:53]:
            (tmp_path / "data" / "colours" / cls / f.name).symlink_to(f)
    second = cli("run", config, "--promote-if-better", "--json")
    doc2 = json.loads(second.stdout)
    assert doc2["extracted"] == 6, "only the 5% new photos are extracted"
    train = next(s for s in doc2["steps"] if s["step"] == "train-head")["did"]
    history = json.loads(cli("runs", "runs/colours", "--json").stdout)["runs"]
    assert len(history) == 2 and history[1]["counts"]["train"] > history[0]["counts"]["train"]
    comparison = json.loads((Path(doc2["run"]) / "meta.json").read_text())["promotion"]
    assert comparison == doc2["comparison"] and comparison["photos"] == len(comparison["compared"])
    better = comparison["better"]  # decided on the same photos for both runs (tests/test_trust.py)
    assert doc2["promoted"] == better and second.exit_code == (0 if better else 3), train
    assert history[1]["latest"] == better and history[1]["promoted"] == better


@pytest.mark.parametrize("name", ["cats_vs_dogs", "oxford_pets", "flowers"])
def test_shipped_configs_parse_for_every_step(name):
    from tlcli.cli.options import read_config
    from tlcli.cli.workflow import STEPS, parse_step

    root = Path(__file__).resolve().parent.parent
    path = root / "configs" / f"{name}.toml"
    doc = read_config(path)
    assert {"extract", "train-head", "evaluate"} <= set(doc) <= set(STEPS)
    parsed = {s: parse_step(s, doc, path, {"run": "x"} if s == "evaluate" else {}) for s in STEPS if s in doc}
    assert parsed["extract"]["data_dir"].parent == root / "data" and parsed["extract"]["alpha"] is None
    recipe = {"size", "resize", "split", "seed", "dropout", "l2", "lr", "epochs", "patience", "refit", "alpha"}
    assert not recipe & {k for table in doc.values() for k in table}, "configs carry no recipe: it is the defaults'"
    assert Path(parsed["train-head"]["features_dir"]) == parsed["extract"]["out_dir"]
    assert parsed["evaluate"]["min_accuracy"] > 0.7
    if "fetch-data" in parsed:
        assert Path(parsed["fetch-data"]["data_dir"]) / parsed["fetch-data"]["source"] == parsed["extract"]["data_dir"]


def test_read_only_output_folder_is_one_line(cli, tmp_path, colour_run, monkeypatch):
    """As root, chmod cannot make a folder read-only, so the file system's EROFS is injected instead."""
    runs = tmp_path / "runs"
    runs.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(runs)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    result = cli("train-head", colour_run.features, "--out", runs, "-q")
    monkeypatch.undo()
    assert result.exit_code == 1
    assert "Read-only file system" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(runs.iterdir()) == []


def test_a_swallowed_interrupt_still_stops_every_commit(tmp_path, monkeypatch):
    """A KeyboardInterrupt lost in a weakref callback must not let the command commit files afterwards."""
    from tlcli import interrupts
    from tlcli.store import runs

    monkeypatch.setattr(interrupts, "_requested", signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(tmp_path / "meta.json", {"a": 1})
    (tmp_path / "run").mkdir()
    with pytest.raises(KeyboardInterrupt):
        runs.publish(tmp_path / "run", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runs.promote(tmp_path, tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_run_backbone_and_alpha_win_over_the_config(tmp_path):
    """Tests and benchmarks run the shipped configs on the offline MobileNet 0.25: the command line wins."""
    from tlcli.cli.options import read_config
    from tlcli.cli.workflow import plan

    root = Path(__file__).resolve().parent.parent
    config = root / "configs" / "cats_vs_dogs.toml"
    common = {"promote_if_better": False, "seed": None, "keep": None, "tensorboard": None, "wait": False}
    shipped = plan(config, read_config(config), **common)
    assert shipped.extract.options["backbone"] == "efficientnetv2b0" and shipped.extract.options["alpha"] is None
    offline = plan(config, read_config(config), **common, backbone={"backbone": "mobilenet", "alpha": 0.25})
    assert offline.extract.options["backbone"] == "mobilenet" and offline.extract.options["alpha"] == 0.25
    assert offline.config["command_line"]["backbone"] == "mobilenet"
