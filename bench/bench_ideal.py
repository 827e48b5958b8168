"""Benchmark `tlcli ideal-image`: defaults vs --tv-weight 0, each in a fresh process.

    .venv/bin/python bench/bench_ideal.py [--target tabby] [--seeds 0]

Prints a table per run: target probability (of the saved 8-bit PNG), total variation (mean absolute
neighbour difference in pixel levels), optimisation seconds and wall seconds of the whole command
(start-up and model build included), then checks the issue's bars: probability >= 0.9 in under a
minute with the defaults, and total variation well below (< 0.5x) that of the --tv-weight 0 run.
Needs the offline MobileNet v1 0.25 weights (../shared/weights) or network access.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


from bench_core import seed_keras_home  # noqa: E402  (bench/ is on sys.path when run as a script)

_KEYS = ("steps", "lr", "tv_weight", "probability", "total_variation", "seconds", "wall_seconds")


def ideal_image(target: str, out: Path, *extra: str) -> dict:
    """One `tlcli ideal-image` in a fresh process; its JSON summary plus the wall time."""
    cmd = [sys.executable, "-m", "tlcli", "ideal-image", target, "--backbone", "mobilenet", "--alpha", "0.25"]
    cmd += ["--out", str(out), "--json", "--quiet", "--device", "cpu", *extra]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return {**json.loads(res.stdout), "wall_seconds": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="tabby", help="ImageNet class to dream up.")
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds; each runs both settings.")
    args = parser.parse_args()
    seed_keras_home()
    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory(prefix="tlcli-bench-ideal-") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for label, extra in (("defaults", ()), ("--tv-weight 0", ("--tv-weight", "0"))):
                out = Path(tmp) / f"{seed}-{len(rows)}.png"
                r = ideal_image(args.target, out, "--seed", str(seed), *extra)
                rows.append({"setting": label, "seed": seed, **{k: r[k] for k in _KEYS}})

    table = Table(title=f"tlcli ideal-image {args.target} (MobileNet v1 0.25, {os.cpu_count()} CPU cores)")
    for col in ("setting", "seed", "steps", "lr", "tv weight", "probability", "total variation", "opt s", "wall s"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        table.add_row(
            r["setting"],
            str(r["seed"]),
            str(r["steps"]),
            f"{r['lr']:g}",
            f"{r['tv_weight']:g}",
            f"{r['probability']:.4f}",
            f"{r['total_variation']:.2f}",
            f"{r['seconds']:.1f}",
            f"{r['wall_seconds']:.1f}",
        )
    Console(width=120).print(table)
    ok = True
    for smooth, noisy in zip(rows[::2], rows[1::2], strict=True):
        checks = {
            "default probability >= 0.9": smooth["probability"] >= 0.9,
            "default run under 60 s (wall)": smooth["wall_seconds"] < 60,
            "--tv-weight 0 probability >= 0.9": noisy["probability"] >= 0.9,
            "total variation < 0.5x that of --tv-weight 0": smooth["total_variation"] < 0.5 * noisy["total_variation"],
        }
        for name, passed in checks.items():
            print(f"seed {smooth['seed']}: {'PASS' if passed else 'FAIL'} {name}")
            ok &= passed
    print(json.dumps({"rows": rows}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
