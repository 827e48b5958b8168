"""What ``tlcli run`` chains: fetch -> extract -> train -> evaluate -> promote, for cron.

Each step is the code of its own command: the command line hands in each command's step function with
the options its config table parsed to (a ``Step``), so a table means here what it means to the command.
This module runs them in order under the output folders' locks, passes each step's output to the next
(the fetched folder to extract, the new run to evaluate), and decides whether the run is promoted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlcli import interrupts
from tlcli.errors import TlcliError
from tlcli.store import files, locks, runs
from tlcli.store.locks import LOCK_NAME

Progress = Callable[..., None]


@dataclass(frozen=True)
class Step:
    """One command's step function and the options its config table parsed to: ``call(options, progress)``
    (train-head's also takes ``defer_promotion`` and ``config``)."""

    call: Callable[..., Any]
    options: dict


@dataclass(frozen=True)
class Plan:
    """The steps to chain, and how their outputs connect and the run is promoted.

    ``extract_fetched``: extract the folder fetch-data wrote (the [extract] table names none). ``config``:
    the record of the config (``record_config``) kept in the run's meta.json and pipeline.json. Options
    are read by their config names: the folders (``out_dir``), ``keep`` and ``min_accuracy``.
    """

    extract: Step
    train: Step
    evaluate: Step
    fetch: Step | None = None
    extract_fetched: bool = False
    config: dict = field(default_factory=dict)
    promote_if_better: bool = False
    wait: bool = False


@dataclass(frozen=True)
class Outcome:
    """What a pipeline run did: the run it trained, whether it was promoted and why, each step's time, and (with
    promote_if_better and a latest) the comparison with latest on the same photos."""

    run: str
    promoted: bool
    reason: str
    accuracy: float
    extracted: int
    seconds: float
    steps: list[dict]
    comparison: dict | None = None


def record_config(path: str | Path, doc: dict, **command_line: Any) -> dict:
    """The config as a run records it: its file, hash, tables and the command line's own options."""
    return {
        "file": str(Path(path).resolve()),
        "sha256": files.sha256(path),
        "tables": doc,
        "command_line": command_line,
    }


class _Log:
    """The steps done so far: what each did and how long it took; a failing step is named with its time."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.steps: list[dict] = []
        self.say = say

    def add(self, name: str, seconds: float, did: str) -> None:
        self.steps.append({"step": name, "seconds": round(seconds, 3), "did": did})

    def run(self, name: str, fn: Callable[[], Any], describe: Callable[[Any], str]) -> Any:
        started = time.perf_counter()
        interrupts.check()
        try:
            summary = fn()
        except TlcliError:
            self.say(f"run: step {name} failed after {time.perf_counter() - started:.1f}s")
            raise
        self.add(name, time.perf_counter() - started, describe(summary))
        return summary


@contextlib.contextmanager
def _locked(folders: list[Path], wait: bool) -> Iterator[None]:
    """Hold the locks of every folder the pipeline writes, so a second run stops at once with the lock message."""
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(locks.lock(folder / LOCK_NAME, f"run is writing {folder}", wait=wait))
        yield


def _describe_extract(s: dict) -> str:
    return (
        f"{s['stored']} images ({s['splits']['train']}/{s['splits']['val']}/{s['splits']['test']}): "
        f"extracted {s['extracted']}, reused {s['reused']}, skipped {len(s['skipped'])}"
    )


def _describe_train(trained) -> str:
    test = f", test {trained.test_accuracy:.4f}" if trained.test_accuracy is not None else ""
    prev = trained.previous_val_accuracy
    c = trained.comparison
    versus = (
        f"on the same {c['photos']} val photos {c['new_accuracy']:.4f} vs latest {c['latest_accuracy']:.4f}"
        if c
        else f"latest had {'-' if prev is None else f'{prev:.4f}'}"
    )
    run = Path(trained.run).name
    return f"run {run}: val {trained.val_accuracy:.4f}{test} after {trained.epochs_run} epochs; {versus}"


def _describe_evaluate(s: dict) -> str:
    return f"accuracy {s['accuracy']:.4f} on {s['n']} images ({s['source']})"


def decide(trained, evaluated: dict, min_accuracy: float | None, promote_if_better: bool) -> tuple[bool, str]:
    """Promote when the evaluation passes ``min_accuracy`` and (with ``promote_if_better``) the run beats latest."""
    passed_gate = min_accuracy is None or evaluated["accuracy"] >= min_accuracy
    if not passed_gate:
        return False, f"accuracy {evaluated['accuracy']:.4f} is below min_accuracy {min_accuracy}"
    if promote_if_better and not trained.better:
        return False, trained.not_better()
    return True, (
        "passed"
        + (f" min_accuracy {min_accuracy}" if min_accuracy is not None else "")
        + (", better than latest" if promote_if_better else "")
    )


def conclude(
    runs_root: str | Path,
    run_dir: str | Path,
    promote: bool,
    evaluation: dict | None = None,
    *,
    keep: int | None = None,
    wait: bool = False,
) -> list[str]:
    """Record a deferred run's verdict (and its evaluation) in meta.json, move ``latest`` if promoted, prune.

    Returns the names of pruned runs.
    """
    runs_root, run_dir = Path(runs_root), Path(run_dir)
    with locks.lock(runs_root / LOCK_NAME, f"train-head is writing {runs_root}", wait=wait):
        meta = files.read_json(run_dir / "meta.json")
        meta["promoted"] = promote
        meta["evaluation"] = evaluation
        files.write_json(run_dir / "meta.json", meta)
        if promote:
            runs.promote(runs_root, run_dir)
        return runs.prune(runs_root, keep) if keep is not None else []


def _promote(plan: Plan, log: _Log, trained, evaluated: dict) -> tuple[bool, str]:
    """The promote step: record the pipeline beside the run, then conclude it (meta.json, latest, pruning)."""
    promote, reason = decide(trained, evaluated, plan.evaluate.options["min_accuracy"], plan.promote_if_better)
    files.write_json(
        Path(trained.run) / "pipeline.json",
        {"config": plan.config, "steps": list(log.steps), "promoted": promote, "reason": reason},
    )
    started = time.perf_counter()
    evaluation = {k: evaluated[k] for k in ("accuracy", "n", "source") if k in evaluated}
    runs_root = plan.train.options["out_dir"]
    pruned = conclude(runs_root, trained.run, promote, evaluation, keep=plan.train.options["keep"], wait=plan.wait)
    did = ("promoted to latest" if promote else "not promoted") + f": {reason}"
    log.add("promote", time.perf_counter() - started, did + (f"; pruned {len(pruned)} old run(s)" if pruned else ""))
    return promote, reason


def run(plan: Plan, *, bars: Callable[[str], AbstractContextManager[Progress]], say: Callable[[str], None]) -> Outcome:
    """Fetch (with a fetch step), extract, train without promoting, evaluate, then promote or not.

    ``bars(description)`` gives each step's progress callback; ``say`` tells which step failed.
    """
    started = time.perf_counter()
    log = _Log(say)
    extract_options = dict(plan.extract.options)
    if plan.fetch is not None:
        with bars("fetching") as bar:
            fetched = log.run(
                "fetch-data",
                lambda: plan.fetch.call(plan.fetch.options, bar),
                lambda s: f"{s['images']} images -> {s['path']}",
            )
        if plan.extract_fetched:
            extract_options["data_dir"] = Path(fetched["path"])
    train = plan.train
    with _locked([Path(extract_options["out_dir"]), Path(train.options["out_dir"])], plan.wait):
        with bars("extracting") as bar:
            extracted = log.run("extract", lambda: plan.extract.call(extract_options, bar), _describe_extract)
        with bars("training head (epochs)") as bar:
            trained = log.run(
                "train-head",
                lambda: train.call(train.options, bar, defer_promotion=True, config=plan.config),
                _describe_train,
            )
        evaluate_options = {**plan.evaluate.options, "run": Path(trained.run)}
        with bars("evaluating") as bar:
            evaluated = log.run("evaluate", lambda: plan.evaluate.call(evaluate_options, bar), _describe_evaluate)
        promote, reason = _promote(plan, log, trained, evaluated)
    return Outcome(
        trained.run,
        promote,
        reason,
        evaluated["accuracy"],
        extracted["extracted"],
        round(time.perf_counter() - started, 3),
        log.steps,
        trained.comparison,
    )
