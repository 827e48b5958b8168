"""The real console script: help, JSON on stdout only, configs, interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, make_photo

TLCLI = [sys.executable, "-m", "tlcli"]


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TLCLI, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=kw.pop("cwd", ROOT),
        env={**os.environ, **kw.pop("env", {})},
        timeout=kw.pop("timeout", 300),
        **kw,
    )


def test_help_lists_commands_and_version():
    result = run("--help")
    assert result.returncode == 0
    for command in ("backbones", "extract", "train-head", "evaluate", "predict"):
        assert command in result.stdout
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("tlcli ")


def test_backbones_json_is_clean_stdout_and_stderr():
    result = run("backbones", "--json")
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    names = {r["name"] for r in rows}
    assert {
        "vgg16",
        "vgg19",
        "resnet50",
        "resnet152v2",
        "mobilenet",
        "mobilenetv2",
        "mobilenetv3small",
        "mobilenetv3large",
        "efficientnetb0",
        "efficientnetb7",
        "efficientnetv2s",
        "densenet121",
        "inceptionv3",
        "xception",
        "convnexttiny",
    } <= names
    mobilenet = next(r for r in rows if r["name"] == "mobilenet")
    assert mobilenet["input_size"] == 224 and 0.25 in mobilenet["alphas"]
    assert mobilenet["measured_input_sizes"] == {"0.25": 320}  # extract's default at alpha 0.25
    assert all(not r["measured_input_sizes"] for r in rows if r["name"] != "mobilenet")
    assert result.stderr == ""  # TensorFlow's start-up chatter is kept off the user's terminal


def test_config_gives_defaults_and_command_line_wins(tmp_path, keras_home):
    data = tmp_path / "data"
    for i in range(6):
        make_photo(data / "a" / f"{i}.jpg", (200, 0, 0), seed=i)
        make_photo(data / "b" / f"{i}.jpg", (0, 0, 200), seed=i)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "w.toml").write_text(
        '[extract]\ndata_dir = "data"\nout = "features/w"\nalpha = 0.25\nsize = 64\nsplit = "0.5,0.25,0.25"\n'
    )
    result = run(
        "extract",
        "--config",
        tmp_path / "configs" / "w.toml",
        "--size",
        "72",
        "--json",
        "--quiet",
        env={"KERAS_HOME": str(keras_home)},
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "features" / "w" / "meta.json").read_text())
    assert meta["input_size"] == 72 and meta["alpha"] == 0.25 and meta["split_fractions"] == [0.5, 0.25, 0.25]
    assert meta["input_size_source"] == "given"
    (tmp_path / "configs" / "bad.toml").write_text("[extract]\nbogus = 1\n")
    bad = run("extract", "--config", tmp_path / "configs" / "bad.toml")
    assert bad.returncode == 2 and "unknown option(s) bogus in [extract]" in bad.stderr


def test_shipped_configs_parse():
    import tomllib

    for name in ("cats_vs_dogs", "oxford_pets", "flowers"):
        doc = tomllib.loads((ROOT / "configs" / f"{name}.toml").read_text())
        assert {"extract", "train-head", "evaluate"} <= set(doc)
        assert doc["extract"]["backbone"] == "efficientnetv2b0"  # for users, who can download its weights


def test_sigint_during_extract_exits_130_and_leaves_no_store(tmp_path, keras_home):
    """800 photos, each four passes at 448 px (crop and pad views, flipped): seconds of work to interrupt.

    Small files keep making them cheap (the backbone sees 448 px whatever their size); the signal goes seven
    seconds after extract takes its lock (TensorFlow is imported after it), once the backbone is built and
    running over the photos.
    """
    data = tmp_path / "data"
    for i in range(400):
        make_photo(data / "a" / f"{i}.jpg", (200, 0, 0), size=(64, 64), seed=i)
        make_photo(data / "b" / f"{i}.jpg", (0, 0, 200), size=(64, 64), seed=i)
    out = tmp_path / "f"
    args = ["extract", data, "--out", out, "--alpha", "0.25", "--size", "448", "--flip", "--quiet"]
    proc = subprocess.Popen(
        [*TLCLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KERAS_HOME": str(keras_home)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not ignored as in a backgrounded run
    )
    deadline = time.monotonic() + 120
    while not (out / ".tlcli.lock").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(7)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() or not any(Path(out).iterdir())


def test_devices_and_gpu_requests_on_a_cpu_machine(cli, tmp_path, keras_home):
    listed = run("devices", "--json")
    assert listed.returncode == 0 and listed.stderr == ""
    info = json.loads(listed.stdout)
    assert any(d["type"] == "CPU" for d in info["devices"])
    if info["gpus"]:
        return  # the rest checks the fallback and errors of a machine without a GPU
    data = tmp_path / "data"
    for i in range(4):
        make_photo(data / "a" / f"{i}.jpg", (200, 0, 0), seed=i)
        make_photo(data / "b" / f"{i}.jpg", (0, 0, 200), seed=i)
    for device in ("gpu", "gpu:0"):  # refusals in this process; the console script's quiet stderr is checked below
        res = cli("extract", data, "--out", tmp_path / "f", "--device", device)
        assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "sees no GPU" in res.stderr
    bad = cli("extract", data, "--out", tmp_path / "f", "--device", "tpu")
    assert bad.exit_code == 2 and "--device 'tpu' is not one of" in bad.stderr
    assert not (tmp_path / "f").exists()
    auto = run(
        "extract", data, "--out", tmp_path / "f", "--alpha", "0.25", "--size", "64", env={"KERAS_HOME": str(keras_home)}
    )
    assert auto.returncode == 0 and "no GPU visible to TensorFlow; running on the CPU" in auto.stderr
    cpu = run(
        "extract",
        data,
        "--out",
        tmp_path / "f",
        "--alpha",
        "0.25",
        "--size",
        "64",
        "--device",
        "cpu",
        "--json",
        env={"KERAS_HOME": str(keras_home)},
    )
    assert cpu.returncode == 0 and json.loads(cpu.stdout)["reused"] == 8 and cpu.stderr == ""


def test_an_interrupt_a_library_turned_into_another_error_still_exits_130(monkeypatch):
    """Ctrl-C landing inside a TensorFlow call came back from pybind11 as "RuntimeError: ... MISMATCH of original
    and normalized active exception types" and exit 1; the stop that was asked for wins."""
    import typer

    from tlcli import interrupts
    from tlcli.cli.console import handles_errors

    monkeypatch.setattr(interrupts, "_requested", None)

    @handles_errors
    def command() -> None:
        try:
            interrupts._request(signal.SIGINT, None)
        except KeyboardInterrupt:
            raise RuntimeError("pybind11::error_already_set: MISMATCH of original and normalized") from None

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 130
