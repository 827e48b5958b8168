"""Run folders: staging, publishing, promotion to latest, history and pruning; the versions a run records."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tlcli import interrupts
from tlcli.errors import UsageError
from tlcli.store.files import read_json, umask, write_bytes

_DISTRIBUTIONS = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos", "tf-nightly"),
    "keras": ("keras", "keras-nightly"),
}
"""The distributions that install each module, so versions are read from their metadata without importing them."""


def _version(module: str) -> str:
    """The installed version of ``module`` from its distribution's metadata (importing TensorFlow takes seconds;
    a re-run with nothing new must not pay for it); imported only if no known distribution provides it."""
    for name in _DISTRIBUTIONS[module]:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return importlib.import_module(module).__version__


def versions() -> dict:
    """Versions of everything that shapes a model's numbers."""
    from tlcli import __version__

    return {
        "tlcli": __version__,
        "tensorflow": _version("tensorflow"),
        "keras": _version("keras"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def timestamp() -> str:
    """UTC timestamp used to name run folders; sorts in time order."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S_%fZ")


@contextlib.contextmanager
def staging_dir(runs_root: str | os.PathLike, *, prefix: str = "") -> Iterator[Path]:
    """Yield a hidden folder ``.<prefix>staging-*`` inside ``runs_root`` to build in; it is removed unless published."""
    root = Path(runs_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{prefix}staging-", dir=root))
        staging.chmod(0o777 & ~umask())
    except OSError as exc:
        raise UsageError(f"cannot write into {root}: {exc.strerror}; free space there or write elsewhere") from None
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, runs_root: str | os.PathLike, *, name: str | None = None) -> Path:
    """Rename a complete staging folder to ``runs_root/<timestamp>`` (or ``<name>``) in one step.

    An existing ``<name>`` is first renamed aside to ``.<name>.old-<pid>``, and deleted once replaced.
    """
    interrupts.check()
    final = Path(runs_root) / (name or timestamp())
    if not name or not (final.exists() or final.is_symlink()):
        os.rename(staging, final)
        return final
    old = final.with_name(f".{name}.old-{os.getpid()}")
    os.rename(final, old)
    os.rename(staging, final)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
    return final


def promote(runs_root: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """Point ``runs_root/latest`` at ``run_dir`` atomically (a relative symlink swapped in by rename)."""
    interrupts.check()
    root = Path(runs_root)
    tmp = root / f".latest.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(Path(run_dir).name, tmp)
    os.replace(tmp, root / "latest")


def resolve_run(path: str | os.PathLike) -> Path:
    """A run folder from a run folder, a ``latest`` link or a runs root; one-line error otherwise."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p} does not exist; give a run folder such as runs/NAME/latest")
    if p.is_dir() and not (p / "model.keras").exists() and (p / "latest").exists():
        p = p / "latest"
    p = p.resolve()
    if not (p / "model.keras").is_file() or not (p / "meta.json").is_file():
        raise UsageError(f"{path} is not a tlcli run (no model.keras/meta.json); train one with 'tlcli train-head'")
    return p


def run_dirs(runs_root: str | os.PathLike) -> list[Path]:
    """Published runs under ``runs_root`` (``<timestamp>/`` with meta.json), oldest first."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and p.name[:1].isdigit() and (p / "meta.json").is_file()
    )


def latest_target(runs_root: str | os.PathLike) -> Path | None:
    """The run ``runs_root/latest`` points at, if any."""
    link = Path(runs_root) / "latest"
    return link.resolve() if link.exists() else None


def prune(runs_root: str | os.PathLike, keep: int) -> list[str]:
    """Delete runs that were never promoted and are older than the newest ``keep``; return their names.

    Promoted runs (the model history) and the current ``latest`` always stay. Each run is renamed to a
    hidden name first, so a crash mid-delete never leaves a half run that looks complete.
    """
    runs = run_dirs(runs_root)
    current = latest_target(runs_root)
    removed = []
    for run in runs[: max(len(runs) - keep, 0)]:
        if run.resolve() == current:
            continue
        try:
            promoted = bool(read_json(run / "meta.json").get("promoted"))
        except UsageError:
            promoted = False
        if promoted:
            continue
        grave = run.with_name(f".pruned-{run.name}")
        os.rename(run, grave)
        shutil.rmtree(grave, ignore_errors=True)
        removed.append(run.name)
    return removed


def _created(run_name: str) -> str | None:
    try:
        return datetime.strptime(run_name[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC).isoformat()
    except ValueError:
        return None


def history(runs_root: str | os.PathLike) -> list[dict]:
    """One row per published run, oldest first: when, data counts, accuracies, promoted, current latest."""
    current = latest_target(runs_root)
    rows = []
    for run in run_dirs(runs_root):
        try:
            meta = read_json(run / "meta.json")
        except UsageError:
            continue
        evaluation = meta.get("evaluation") or {}
        rows.append(
            {
                "run": run.name,
                "path": str(run),
                "created": _created(run.name),
                "counts": meta.get("counts", {}),
                "backbone": meta.get("backbone"),
                "val_accuracy": meta.get("val_accuracy"),
                "test_accuracy": meta.get("test_accuracy"),
                "evaluation_accuracy": evaluation.get("accuracy"),
                "promoted": bool(meta.get("promoted")),
                "latest": run.resolve() == current,
            }
        )
    return rows


class Checkpoint:
    """Where a run's training state after its last finished epoch waits, in ``RUNS/.resume-<key>/``, for the
    same command to resume it; removed once the run is published (or by ``--no-resume``).

    ``key`` names everything that shapes the training, so only an identical command resumes it. One .npz
    holds groups of arrays (weights, optimizer state, ...) and a JSON state, replaced atomically each epoch.
    """

    def __init__(self, runs_root: str | os.PathLike, key: str) -> None:
        self.folder = Path(runs_root) / f".resume-{key}"
        self.path = self.folder / "checkpoint.npz"

    def save(self, state: dict, groups: dict[str, list[np.ndarray]]) -> None:
        """Replace the checkpoint with ``state`` (JSON) and the arrays of each group, in order."""
        arrays = {f"{name}.{i}": a for name, group in groups.items() for i, a in enumerate(group)}
        buf = io.BytesIO()
        np.savez(buf, state=np.asarray(json.dumps(state)), **arrays)
        write_bytes(self.path, buf.getvalue())

    def load(self) -> tuple[dict, dict[str, list[np.ndarray]]] | None:
        """The saved state and array groups, or None when there is none or it does not read."""
        try:
            with np.load(self.path, allow_pickle=False) as z:
                state = json.loads(str(z["state"]))
                groups: dict[str, list[np.ndarray]] = {}
                for key in sorted((k for k in z.files if k != "state"), key=lambda k: int(k.rsplit(".", 1)[1])):
                    groups.setdefault(key.rsplit(".", 1)[0], []).append(z[key])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return state, groups

    def clear(self) -> None:
        """Forget the checkpoint (the run is published, or the command asked to start over)."""
        shutil.rmtree(self.folder, ignore_errors=True)
