"""Benchmark tlcli's start-up: the commands that run no model, each timed as a whole process.

    .venv/bin/python bench/bench_startup.py [--runs 9] [--runs-dir runs/pets]

Times `tlcli --help`, `tlcli runs DIR`, `tlcli fetch-data --list` and `tlcli backbones` from process
start to exit (interpreter start-up, imports, Typer parsing, output), several runs each after one
warm-up, and prints min and median wall time against the 0.6 s target, and the median CPU time (which
a busy machine inflates less). `python -c "import tensorflow"` is timed too: what these commands would
cost if they imported TensorFlow. DIR is an empty folder unless --runs-dir names a real one. Exits 1
when a command fails or its median wall time misses the target: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.6


def tlcli_command() -> list[str]:
    """The installed console script beside this Python (what users run), else ``python -m tlcli``."""
    script = Path(sys.executable).with_name("tlcli")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tlcli"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_process(cmd: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) seconds of ``runs`` runs of ``cmd`` after one untimed warm-up.

    A failing command stops the benchmark: a quick error would pass for a quick start.
    """
    wall, cpu = [], []
    for i in range(runs + 1):
        cpu_start, start = _children_cpu(), time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed, used = time.perf_counter() - start, _children_cpu() - cpu_start
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        if i:
            wall.append(elapsed)
            cpu.append(used)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="Timed runs per command (after one warm-up).")
    parser.add_argument("--tf-runs", type=int, default=3, help="Timed runs of 'import tensorflow'.")
    parser.add_argument("--runs-dir", type=Path, help="Runs folder for 'tlcli runs' (default: an empty folder).")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from rich.console import Console
    from rich.table import Table

    tlcli = tlcli_command()
    with tempfile.TemporaryDirectory(prefix="tlcli-bench-startup-") as tmp:
        runs_dir = str(args.runs_dir or tmp)
        commands = {
            "tlcli --help": [*tlcli, "--help"],
            "tlcli runs DIR": [*tlcli, "runs", runs_dir],
            "tlcli fetch-data --list": [*tlcli, "fetch-data", "--list"],
            "tlcli backbones": [*tlcli, "backbones"],
        }
        timed = {label: time_process(cmd, args.runs) for label, cmd in commands.items()}
        baseline = {
            "python -c pass": time_process([sys.executable, "-c", "pass"], args.runs),
            'python -c "import tensorflow"': time_process([sys.executable, "-c", "import tensorflow"], args.tf_runs),
        }

    table = Table(title=f"start-up in seconds ({os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f})")
    for col in ("command", "runs", "min s", "median s", "median CPU s", "target s", "ok"):
        table.add_column(col, justify="left" if col == "command" else "right")
    ok = True
    for label, (wall, cpu) in {**timed, **baseline}.items():
        median = statistics.median(wall)
        gated = label in timed
        passed = median < TARGET_S
        ok &= passed or not gated
        verdict = ("yes" if passed else "NO") if gated else "-"
        target = f"{TARGET_S:g}" if gated else "-"
        cells = (f"{min(wall):.3f}", f"{median:.3f}", f"{statistics.median(cpu):.3f}", target, verdict)
        table.add_row(label, str(len(wall)), *cells)
    Console(width=100).print(table)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
