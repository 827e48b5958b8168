"""Benchmark tlcli's core against the plain Keras way, on the same photos in the same run.

    .venv/bin/python bench/bench_core.py [--data ../shared/data/cats_vs_dogs] [--epochs 10]

Prints a table:
  1. extract: tlcli extract (images/s) vs image_dataset_from_directory + model.predict;
  2. head training: train-head on stored features vs the same head trained end to end through the
     frozen backbone, for the same number of epochs;
  3. incremental: re-extract after adding 5% new images vs a full extract;
  4. peak memory of extract as the dataset grows (each size in a fresh process).
Needs the offline MobileNet v1 0.25 weights (../shared/weights) or network access.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def seed_keras_home() -> None:
    if "KERAS_HOME" in os.environ or not (SHARED / "weights").is_dir():
        return
    home = Path(tempfile.mkdtemp(prefix="tlcli-bench-keras-"))
    (home / "models").mkdir()
    for f in (SHARED / "weights").iterdir():
        shutil.copy(f, home / "models" / f.name)
    os.environ["KERAS_HOME"] = str(home)


def link_dataset(src: Path, dst: Path, limit: int | None = None, skip: int = 0) -> int:
    """Symlink up to ``limit`` images per class from src into dst (skipping the first ``skip``)."""
    n = 0
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        files = sorted(f for f in cls.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[skip:]
        for f in files[:limit]:
            os.symlink(f, dst / cls.name / f.name)
            n += 1
    return n


def upscaled_copy(src: Path, dst: Path, factor: float) -> int:
    """Re-encode every photo at ``factor`` times its size (JPEG q90): camera-sized inputs from small ones."""
    from PIL import Image

    n = 0
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir()):
            if f.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            with Image.open(f) as im:
                im = im.convert("RGB")
                im.resize((round(im.width * factor), round(im.height * factor)), Image.BICUBIC).save(
                    dst / cls.name / f"{f.stem}.jpg", quality=90
                )
            n += 1
    return n


def plain_keras_extract(data: Path, size: int, batch: int) -> tuple[float, int]:
    import keras
    import tensorflow as tf

    model = keras.applications.MobileNet(alpha=0.25, input_shape=(size, size, 3), include_top=False, pooling="avg")
    start = time.perf_counter()
    ds = keras.utils.image_dataset_from_directory(
        data, image_size=(size, size), batch_size=batch, shuffle=False, crop_to_aspect_ratio=True, verbose=False
    )
    ds = ds.map(lambda x, y: keras.applications.mobilenet.preprocess_input(x)).prefetch(tf.data.AUTOTUNE)
    out = model.predict(ds, verbose=0)
    return time.perf_counter() - start, len(out)


def tlcli_extract(data: Path, out: Path, size: int, batch: int, resize: str = "crop") -> dict:
    from tlcli import features

    return features.extract(data, out, backbone="mobilenet", alpha=0.25, size=size, batch_size=batch, resize=resize)


def plain_keras_head_training(data: Path, size: int, epochs: int, n_classes: int) -> float:
    """The same dropout + dense softmax head, trained end to end through the frozen backbone."""
    import keras
    import tensorflow as tf

    backbone = keras.applications.MobileNet(alpha=0.25, input_shape=(size, size, 3), include_top=False, pooling="avg")
    backbone.trainable = False
    inputs = keras.Input((size, size, 3))
    x = backbone(keras.applications.mobilenet.preprocess_input(inputs), training=False)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=keras.regularizers.l2(1e-3))(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    ds = keras.utils.image_dataset_from_directory(
        data, image_size=(size, size), batch_size=64, seed=0, crop_to_aspect_ratio=True, verbose=False
    )
    ds = ds.prefetch(tf.data.AUTOTUNE)
    start = time.perf_counter()
    model.fit(ds, epochs=epochs, verbose=0)
    return time.perf_counter() - start


def fresh_process_seconds(kind: str, data: Path, out: Path, size: int, batch: int, resize: str = "crop") -> float:
    """Time one extraction ('plain' or 'tlcli') in a new Python process, as a user's command would run."""
    code = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import bench_core as b\n"
        "import keras, tensorflow, tlcli.features  # imports are not part of either timing\n"
        f"kind, data, out = {kind!r}, {str(data)!r}, {str(out)!r}\n"
        f"t = b.plain_keras_extract(b.Path(data), {size}, {batch})[0] if kind == 'plain' else "
        f"b.tlcli_extract(b.Path(data), b.Path(out), {size}, {batch}, {resize!r})['seconds']\n"
        "print(json.dumps(t))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    return float(res.stdout.strip().splitlines()[-1])


def median_seconds(kind: str, data: Path, work: Path, size: int, batch: int, reps: int, resize: str = "crop") -> float:
    times = []
    for i in range(reps):
        out = work / f"{kind}-{data.name}-{resize}-{i}"
        times.append(fresh_process_seconds(kind, data, out, size, batch, resize))
        shutil.rmtree(out, ignore_errors=True)
    return sorted(times)[len(times) // 2]


def peak_rss_mb(data: Path, out: Path, size: int) -> float:
    code = (
        "import resource, sys\n"
        "from tlcli import features\n"
        f"features.extract({str(data)!r}, {str(out)!r}, backbone='mobilenet', alpha=0.25, size={size})\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cats_vs_dogs")
    parser.add_argument(
        "--extra",
        type=Path,
        default=SHARED / "data" / "oxford_pets",
        help="photos added as the 'new 5%%' in the incremental run and to grow the set",
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3, help="fresh-process repetitions per extraction timing")
    parser.add_argument(
        "--upscale",
        type=float,
        default=2.0,
        help="also compare extraction on copies re-encoded at this factor (camera-sized photos)",
    )
    args = parser.parse_args()
    seed_keras_home()
    from rich.console import Console
    from rich.table import Table

    from tlcli import head

    work = Path(tempfile.mkdtemp(prefix="tlcli-bench-"))
    rows = []
    try:
        data = work / "data"
        n = link_dataset(args.data, data)
        classes = len([p for p in data.iterdir() if p.is_dir()])

        plain_keras_extract(data, args.size, args.batch)  # warm the file cache
        big = work / "big"
        upscaled_copy(data, big, args.upscale)
        for label, folder in (("", data), (f", photos x{args.upscale:g}", big)):
            t_plain = median_seconds("plain", folder, work, args.size, args.batch, args.reps)
            t_tlcli = median_seconds("tlcli", folder, work, args.size, args.batch, args.reps)
            rows.append(
                (
                    f"extract{label} (images/s)",
                    f"{n / t_plain:.0f}",
                    f"{n / t_tlcli:.0f}",
                    f"{t_plain / t_tlcli:.2f}x",
                    f"{n} images, MobileNet 0.25 @ {args.size}, centre crop; median of {args.reps} fresh processes, "
                    "timed from model build to vectors",
                )
            )
        t_views = median_seconds("tlcli", data, work, args.size, args.batch, args.reps, resize="crop+pad")
        rows.append(
            (
                "extract, default crop+pad (images/s)",
                "",
                f"{n / t_views:.0f}",
                "",
                "two views per image (tlcli's default, more accurate)",
            )
        )
        tlcli_extract(data, work / "features", args.size, args.batch)
        tlcli_extract(data, work / "features_views", args.size, args.batch, resize="crop+pad")

        t_e2e = plain_keras_head_training(data, args.size, args.epochs, classes)
        trained = head.train(work / "features", work / "runs", epochs=args.epochs, patience=args.epochs, refit=False)
        rows.append(
            (
                "head training (s)",
                f"{t_e2e:.2f}",
                f"{trained['fit_seconds']:.2f}",
                f"{t_e2e / trained['fit_seconds']:.0f}x",
                f"{args.epochs} epochs; tlcli total incl. saving the model {trained['seconds']:.1f}s",
            )
        )

        added = 0
        per_class = max(1, round(0.05 * n / classes))
        extra_files = sorted(f for f in args.extra.rglob("*.jpg"))[: per_class * classes]
        for i, f in enumerate(extra_files):
            cls = sorted(p.name for p in data.iterdir() if p.is_dir())[i % classes]
            os.symlink(f, data / cls / f"new_{i}_{f.name}")
            added += 1
        again = tlcli_extract(data, work / "features_views", args.size, args.batch, resize="crop+pad")
        full = tlcli_extract(data, work / "features_full", args.size, args.batch, resize="crop+pad")
        rows.append(
            (
                "incremental extract (s)",
                f"{full['seconds']:.1f}",
                f"{again['seconds']:.1f}",
                f"{again['seconds'] / full['seconds']:.0%} of full",
                f"+{added} new images ({added / n:.0%}); extracted {again['extracted']}, reused {again['reused']}",
            )
        )

        mems = []
        for limit in (125, 250, 500):
            sub = work / f"grow{limit}"
            count = link_dataset(args.data, sub, limit=limit)
            mems.append((count, peak_rss_mb(sub, work / f"grow{limit}_f", args.size)))
        rows.append(
            (
                "peak memory of extract (MB)",
                "",
                " / ".join(f"{m:.0f}" for _, m in mems),
                "",
                "for " + " / ".join(str(c) for c, _ in mems) + " images",
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title="tlcli vs plain Keras (same images, same run)")
    for col in ("what", "plain Keras", "tlcli", "ratio", "notes"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
