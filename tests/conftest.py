"""Shared fixtures: offline Keras weights, ../shared photos, small synthetic datasets, the CLI runner."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TLCLI_SHARED", ROOT.parent / "shared"))
REQUIRE_SHARED = os.environ.get("TLCLI_REQUIRE_SHARED") == "1"
SLOW_TIMEOUT = 1200  # seconds before pytest-timeout ends a test marked slow (pyproject's `timeout` for the rest)

_KERAS_HOME = Path(tempfile.mkdtemp(prefix="tlcli-keras-home-"))
os.environ["KERAS_HOME"] = str(_KERAS_HOME)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TLCLI_ENGINE", "keras")  # auto would convert every test's backbone for OpenVINO (seconds each)
if (SHARED / "weights").is_dir():
    (_KERAS_HOME / "models").mkdir(parents=True, exist_ok=True)
    for f in (SHARED / "weights").iterdir():
        if f.suffix in (".h5", ".json"):
            shutil.copy(f, _KERAS_HOME / "models" / f.name)


def pytest_collection_modifyitems(items) -> None:
    """Tests marked slow take minutes: they get SLOW_TIMEOUT unless they name their own limit."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


def pytest_terminal_summary(terminalreporter) -> None:
    """What tests measured (``record_property("measured", text)``: accuracies on real photos and the like),
    shown after the results; a print from inside an xdist worker would be lost."""
    reports = terminalreporter.getreports("passed") + terminalreporter.getreports("failed")
    lines = [value for report in reports for name, value in report.user_properties if name == "measured"]
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.write_line(line)


def _need(path: Path, what: str) -> Path:
    if path.exists():
        return path
    message = f"{what} not found at {path} (the team's ../shared folder beside the checkout)"
    if REQUIRE_SHARED:
        pytest.fail(f"{message}; TLCLI_REQUIRE_SHARED=1 makes this a failure")
    pytest.skip(message)


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless-capable Chromium for tests that look at a page as a browser renders it; skipped when absent
    (a failure under TLCLI_REQUIRE_SHARED=1, which .ci/run sets after installing it)."""
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found:
        return found
    message = "chromium not found; install it with 'sudo apt-get install -y chromium' (Debian/Ubuntu)"
    if REQUIRE_SHARED:
        pytest.fail(f"{message}; TLCLI_REQUIRE_SHARED=1 makes this a failure")
    pytest.skip(message)


@pytest.fixture(scope="session")
def keras_home() -> Path:
    """A KERAS_HOME seeded with the offline MobileNet v1 0.25 ImageNet weights."""
    _need(SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5", "offline ImageNet weights")
    return _KERAS_HOME


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real labelled photos."""
    return _need(SHARED / "data", "real photos")


@pytest.fixture(scope="session")
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture()
def cli(runner):
    """Invoke the tlcli app in-process: cli("extract", ...) -> result with exit_code, stdout, stderr."""
    from tlcli.cli.app import app

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def make_photo(path: Path, colour: tuple[int, int, int], size=(48, 40), seed: int = 0, fmt: str | None = None) -> Path:
    """A small textured RGB image of a dominant colour, so classes are learnable from pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.asarray(colour, np.float32) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def make_colours(root: Path) -> Path:
    """Two classes (red, blue) of 12 small JPEGs each under ``root``."""
    for i in range(12):
        make_photo(root / "red" / f"r{i}.jpg", (200, 40, 40), seed=i)
        make_photo(root / "blue" / f"b{i}.jpg", (40, 40, 200), seed=100 + i)
    return root


@pytest.fixture()
def colour_dataset(tmp_path) -> Path:
    """Two classes (red, blue) of 12 small JPEGs each, the test's own to change."""
    return make_colours(tmp_path / "colours")


COLOUR_EXTRACT = ("--alpha", "0.25", "--size", "96", "--quiet")  # MobileNet v1 0.25, ImageNet weights, crop+pad


@dataclass(frozen=True)
class ColourRun:
    """The colour photos extracted (COLOUR_EXTRACT) and a head trained on them with train-head's defaults."""

    data: Path
    features: Path
    runs: Path
    extracted: dict
    trained: dict

    @property
    def latest(self) -> Path:
        return self.runs / "latest"

    def copy_runs(self, dest: Path) -> Path:
        """A copy of the runs folder (its relative ``latest`` link included) for a test that adds to it."""
        return Path(shutil.copytree(self.runs, dest, symlinks=True))


@pytest.fixture(scope="session")
def colour_run(runner, keras_home, tmp_path_factory) -> ColourRun:
    """One extract and train-head shared by the tests that only read them; copy what a test changes."""
    from tlcli.cli.app import app

    root = tmp_path_factory.mktemp("colour-run")
    data, store, runs = make_colours(root / "colours"), root / "features", root / "runs"

    def invoke(*args) -> dict:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    extracted = invoke("extract", data, "--out", store, *COLOUR_EXTRACT, "--json")
    trained = invoke("train-head", store, "--out", runs, "--json", "--quiet")
    return ColourRun(data, store, runs, extracted, trained)


HOLD_LOCK = """
import sys
from tlcli.store import locks
with locks.lock(sys.argv[1], "test is holding " + sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held(path: Path, *prefix: str):
    """Another process (run under ``prefix``, e.g. ``unshare ...``) holds the kernel lock of ``path`` until
    the block ends; yields that process."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [*prefix, sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n", "the lock holder did not start"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
