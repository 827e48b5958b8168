"""Benchmark the feature store at scale: does the cost of a re-run follow the change?

    .venv/bin/python bench/bench_store.py [--n 100000] [--size 32] [--epochs 5] [--keep DIR]

Generates ``--n`` small distinct JPEGs (10 classes, 40x40) in a temp folder (never committed), then
runs, each as its own ``tlcli`` process: a full extract (MobileNet v1 0.25 at ``--size``), a no-change
re-run, a re-run after adding 1% new photos, and train-head on the store. For each it prints wall
seconds, the child's peak resident memory (getrusage via wait4) and the bytes it wrote (/proc/<pid>/io
write_bytes less cancelled_write_bytes, the scratch file of new vectors deleted before it reached the disk; read
from the exited child before it is reaped), against the full run.
Checks the issue's bar: the +1% run writes at most 2% of the full run's bytes in at most 5% of its time.
Needs the offline MobileNet v1 0.25 weights (../shared/weights, or $TLCLI_SHARED/weights) or network access.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TLCLI = [sys.executable, "-c", "from tlcli.cli.app import run; run()"]
CLASSES = 10


def _photos(args: tuple[str, int, int]) -> int:
    """Write photos ``start`` .. ``stop`` - 1 (class colour plus per-photo noise, so each is distinct)."""
    from PIL import Image

    folder, start, stop = args
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        cls = i % CLASSES
        base = np.array([25 * cls, 255 - 25 * cls, (80 * cls) % 256], np.float32)
        pixels = np.clip(base + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=80)
        (Path(folder) / f"c{cls}" / f"img_{i:07d}.jpg").write_bytes(buf.getvalue())
    return stop - start


def make_photos(folder: Path, start: int, stop: int) -> None:
    """Photos ``start`` .. ``stop`` - 1 into ``folder``, in two processes."""
    for cls in range(CLASSES):
        (folder / f"c{cls}").mkdir(parents=True, exist_ok=True)
    step = 2000
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_photos, [(str(folder), a, min(a + step, stop)) for a in range(start, stop, step)]))


def measured(args: list[str]) -> dict:
    """Run ``tlcli args`` as a child: wall seconds, peak RSS (MB) and bytes written (MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen([*TLCLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    seconds = time.perf_counter() - started
    io_lines = dict(line.split(": ") for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"tlcli {' '.join(args)} failed: {proc.stderr.read().decode()[-2000:]}")
    written = int(io_lines["write_bytes"]) - int(io_lines["cancelled_write_bytes"])
    return {"s": seconds, "rss": usage.ru_maxrss / 1024, "mb": written / 1e6}


def store_mb(store: Path) -> float:
    return sum(p.stat().st_size for p in store.iterdir() if p.is_file()) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="photos in the synthetic folder")
    p.add_argument("--size", type=int, default=32, help="extract input size (small: this measures the store)")
    p.add_argument("--epochs", type=int, default=5, help="train-head epochs")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder, deleted)")
    args = p.parse_args()
    bench_core.SHARED = Path(os.environ.get("TLCLI_SHARED", bench_core.SHARED))
    bench_core.seed_keras_home()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    work = args.keep or Path(tempfile.mkdtemp(prefix="tlcli-bench-store-"))
    data, store = work / "data", work / "store"
    try:
        t = time.perf_counter()
        make_photos(data, 0, args.n)
        print(f"{args.n} photos generated in {time.perf_counter() - t:.0f} s under {work}", flush=True)
        extract = ["extract", str(data), "--out", str(store), "--alpha", "0.25", "--size", str(args.size), "-q"]
        rows = [("full extract", measured(extract))]
        rows.append(("no-change re-run", measured(extract)))
        make_photos(data, args.n, args.n + args.n // 100)
        rows.append((f"+1% re-run ({args.n // 100} new)", measured(extract)))
        train = ["train-head", str(store), "--out", str(work / "runs"), "--epochs", str(args.epochs), "-q"]
        rows.append((f"train-head ({args.epochs} epochs)", measured(train)))
        report(rows, args.n, store_mb(store))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def report(rows: list[tuple[str, dict]], n: int, size_mb: float) -> None:
    """Print the table and the issue's bar for the +1% run."""
    full = rows[0][1]
    print(f"\n{n} photos, store {size_mb:.0f} MB on disk\n")
    print("| step | seconds | % of full | peak RSS MB | MB written | % of full |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        share = f"{100 * r['s'] / full['s']:.1f}" if not name.startswith("train") else ""
        written = f"{100 * r['mb'] / full['mb']:.2f}" if not name.startswith("train") else ""
        print(f"| {name} | {r['s']:.1f} | {share} | {r['rss']:.0f} | {r['mb']:.1f} | {written} |")
    plus = rows[2][1]
    ok = plus["mb"] <= 0.02 * full["mb"] and plus["s"] <= 0.05 * full["s"]
    print(f"\n+1% re-run within 2% of the bytes and 5% of the time of the full run: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
