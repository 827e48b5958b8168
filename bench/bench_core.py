"""Benchmark tlcli's core against the plain Keras way, on the same photos in the same run.

    .venv/bin/python bench/bench_core.py [--data ../shared/data/cats_vs_dogs] [--epochs 10]

Prints a table:
  1. extract: tlcli extract (images/s) vs image_dataset_from_directory + model.predict, both timed
     in fresh processes from building the model to the feature vectors (imports excluded);
  2. head training: train-head on stored features vs the same head trained end to end through the
     frozen backbone, for the same number of epochs;
  3. incremental: re-extract after adding 5% new images vs a full extract (fresh processes), on the
     cats_vs_dogs photos and on every photo of ../shared/data;
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


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def link_dataset(src: Path, dst: Path, limit: int | None = None, skip: int = 0) -> int:
    """Symlink up to ``limit`` images per class from src into dst (skipping the first ``skip``)."""
    n = 0
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        files = sorted(f for f in cls.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES)[skip:]
        for f in files[:limit]:
            os.symlink(f, dst / cls.name / f.name)
            n += 1
    return n


def link_all_sets(src: Path, dst: Path, every: int) -> tuple[Path, Path, int, int]:
    """Every photo of every set in ``src`` as classes ``<set>__<class>``: a base folder without each
    ``every``-th photo and a grown folder with all of them. Returns (base, grown, n base, n new)."""
    base, grown = dst / "base", dst / "grown"
    photos = sorted(f for f in src.glob("*/*/*") if f.suffix.lower() in PHOTO_SUFFIXES)
    new = set(photos[::every])
    for f in photos:
        cls = f"{f.parent.parent.name}__{f.parent.name}"
        for root in (grown,) if f in new else (base, grown):
            (root / cls).mkdir(parents=True, exist_ok=True)
            os.symlink(f, root / cls / f.name)
    return base, grown, len(photos) - len(new), len(new)


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
    """The plain Keras way, timed like tlcli's ``seconds``: from building the model to the vectors."""
    import keras
    import tensorflow as tf

    start = time.perf_counter()
    model = keras.applications.MobileNet(alpha=0.25, input_shape=(size, size, 3), include_top=False, pooling="avg")
    ds = keras.utils.image_dataset_from_directory(
        data, image_size=(size, size), batch_size=batch, shuffle=False, crop_to_aspect_ratio=True, verbose=False
    )
    ds = ds.map(lambda x, y: keras.applications.mobilenet.preprocess_input(x)).prefetch(tf.data.AUTOTUNE)
    out = model.predict(ds, verbose=0)
    return time.perf_counter() - start, len(out)


def tlcli_extract(data: Path, out: Path, size: int, batch: int, resize: str = "crop") -> dict:
    from tlcli.train.extract import extract
    from tlcli.train.recipes import ExtractRecipe

    return extract(data, out, ExtractRecipe(alpha=0.25, size=size, resize=resize, batch_size=batch))


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
        "import keras, tensorflow, tlcli.train.extract  # imports are not part of either timing\n"
        f"kind, data, out = {kind!r}, {str(data)!r}, {str(out)!r}\n"
        f"t = b.plain_keras_extract(b.Path(data), {size}, {batch})[0] if kind == 'plain' else "
        f"b.tlcli_extract(b.Path(data), b.Path(out), {size}, {batch}, {resize!r})['seconds']\n"
        "print(json.dumps(t))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    return float(res.stdout.strip().splitlines()[-1])


def interleaved_medians(
    kinds: list[tuple[str, str]], data: Path, work: Path, size: int, batch: int, reps: int
) -> dict[tuple[str, str], float]:
    """Median seconds of each (kind, resize) over ``reps`` rounds of fresh processes, one of each kind a round."""
    times: dict[tuple[str, str], list[float]] = {k: [] for k in kinds}
    for i in range(reps):
        for kind, resize in kinds:
            out = work / f"{kind}-{data.name}-{resize}-{i}"
            times[kind, resize].append(fresh_process_seconds(kind, data, out, size, batch, resize))
            shutil.rmtree(out, ignore_errors=True)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def incremental_row(
    label: str, base: Path, grown: Path, n_new: int, work: Path, size: int, batch: int, reps: int
) -> tuple[str, ...]:
    """Re-extract ``grown`` into a copy of ``base``'s store vs a full extract of ``grown``, each a fresh
    process (default crop+pad), interleaved; medians of ``reps``."""
    store = work / f"store-{label}"
    tlcli_extract(base, store, size, batch, resize="crop+pad")
    again, full = [], []
    for i in range(reps):
        out = work / f"again-{label}-{i}"
        shutil.copytree(store, out)
        again.append(fresh_process_seconds("tlcli", grown, out, size, batch, "crop+pad"))
        full.append(fresh_process_seconds("tlcli", grown, work / f"full-{label}-{i}", size, batch, "crop+pad"))
        shutil.rmtree(out)
        shutil.rmtree(work / f"full-{label}-{i}")
    t_again, t_full = sorted(again)[reps // 2], sorted(full)[reps // 2]
    n = sum(1 for _ in grown.rglob("*") if _.is_symlink())
    return (
        f"incremental extract, {label} (s)",
        f"{t_full:.1f} (full)",
        f"{t_again:.2f}",
        f"{t_again / t_full:.0%} of full",
        f"{n} images of which {n_new} new ({n_new / (n - n_new):.0%}), crop+pad; median of {reps} fresh processes",
    )


def peak_rss_mb(data: Path, out: Path, size: int) -> float:
    code = (
        "import resource, sys\n"
        "from tlcli.train.extract import extract\n"
        "from tlcli.train.recipes import ExtractRecipe\n"
        f"extract({str(data)!r}, {str(out)!r}, ExtractRecipe(alpha=0.25, size={size}))\n"
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

    from tlcli.train import trainer
    from tlcli.train.recipes import HeadRecipe

    load_start = os.getloadavg()
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
            kinds = [("plain", "crop"), ("tlcli", "crop")] + ([("tlcli", "crop+pad")] if folder == data else [])
            t = interleaved_medians(kinds, folder, work, args.size, args.batch, args.reps)
            rows.append(
                (
                    f"extract{label}, centre crop (images/s)",
                    f"{n / t['plain', 'crop']:.0f}",
                    f"{n / t['tlcli', 'crop']:.0f}",
                    f"{t['plain', 'crop'] / t['tlcli', 'crop']:.2f}x",
                    f"{n} images, MobileNet 0.25 @ {args.size}, batch {args.batch}; median of {args.reps} fresh "
                    "processes each, interleaved, timed from model build to vectors",
                )
            )
            if ("tlcli", "crop+pad") in t:
                rows.append(
                    (
                        "extract, default crop+pad (images/s)",
                        f"{n / t['plain', 'crop']:.0f}",
                        f"{n / t['tlcli', 'crop+pad']:.0f}",
                        f"{t['plain', 'crop'] / t['tlcli', 'crop+pad']:.2f}x",
                        "tlcli's default: two views (crop and pad) per image through the backbone; plain is one view",
                    )
                )
        tlcli_extract(data, work / "features", args.size, args.batch)

        t_e2e = plain_keras_head_training(data, args.size, args.epochs, classes)
        recipe = HeadRecipe(epochs=args.epochs, patience=args.epochs, refit=False)
        trained = trainer.train(work / "features", work / "runs", recipe).summary()
        rows.append(
            (
                "head training (s)",
                f"{t_e2e:.2f}",
                f"{trained['fit_seconds']:.2f}",
                f"{t_e2e / trained['fit_seconds']:.0f}x",
                f"{args.epochs} epochs; tlcli total incl. saving the model {trained['seconds']:.1f}s",
            )
        )

        grown = work / "grown"
        shutil.copytree(data, grown, symlinks=True)
        per_class = max(1, round(0.05 * n / classes))
        extra_files = sorted(f for f in args.extra.rglob("*.jpg"))[: per_class * classes]
        for i, f in enumerate(extra_files):
            cls = sorted(p.name for p in grown.iterdir() if p.is_dir())[i % classes]
            os.symlink(f, grown / cls / f"new_{i}_{f.name}")
        rows.append(
            incremental_row(args.data.name, data, grown, len(extra_files), work, args.size, args.batch, args.reps)
        )
        base, grown_all, _, n_new = link_all_sets(args.data.parent, work / "all", 20)
        rows.append(incremental_row("all photos", base, grown_all, n_new, work, args.size, args.batch, args.reps))

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

    loads = " -> ".join("/".join(f"{x:.1f}" for x in load) for load in (load_start, os.getloadavg()))
    table = Table(title=f"tlcli vs plain Keras (same images, same run; load average 1/5/15 min {loads})")
    for col in ("what", "plain Keras", "tlcli", "ratio", "notes"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    print(json.dumps({"rows": rows, "load_average": loads}))


if __name__ == "__main__":
    main()
