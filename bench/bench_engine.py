"""Benchmark extract's engines against plain Keras, on the same photos in the same run.

    .venv/bin/python bench/bench_engine.py [--data ../shared/data/cats_vs_dogs] [--images 1000]
        [--backbones mobilenetv2,resnet50] [--reps 1]

For each backbone (weights=None, 224 px) times, each in a fresh process from building the model to the
vectors (imports excluded), one after another in each round:
  plain            image_dataset_from_directory (centre crop) + preprocess_input + model.predict;
  crop keras       tlcli extract --resize crop --engine keras (the same work as plain), new store;
  crop openvino    tlcli extract --resize crop --engine openvino, new store (tracing and conversion included);
  crop openvino, cached   the same into a store that already holds the converted graph (from 2 other photos);
  default openvino tlcli extract's default recipe (crop+pad: two views an image) on OpenVINO, new store.
Prints images/s (median over rounds) and each one's ratio to plain Keras, with the load average: other
jobs on the machine slow every column, so compare ratios within one run. A first table times the network
alone on a few batches, in this process (``network_alone``); ``--network-only`` prints just that one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_core import link_dataset

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FAMILY = {"mobilenetv2": ("MobileNetV2", "mobilenet_v2"), "resnet50": ("ResNet50", "resnet")}
CASES = ("plain", "crop keras", "crop openvino", "crop openvino, cached", "default openvino")


def plain_keras_extract(data: Path, backbone: str, batch: int) -> float:
    """The plain Keras way, timed like tlcli's ``seconds``: from building the model to the vectors."""
    import time

    import keras
    import tensorflow as tf

    name, module = FAMILY[backbone]
    start = time.perf_counter()
    model = getattr(keras.applications, name)(weights=None, include_top=False, pooling="avg", input_shape=(224, 224, 3))
    preprocess = getattr(keras.applications, module).preprocess_input
    ds = keras.utils.image_dataset_from_directory(
        data, image_size=(224, 224), batch_size=batch, shuffle=False, crop_to_aspect_ratio=True, verbose=False
    )
    model.predict(ds.map(lambda x, y: preprocess(x)).prefetch(tf.data.AUTOTUNE), verbose=0)
    return time.perf_counter() - start


def tlcli_extract(
    data: Path, out: Path, backbone: str, batch: int, resize: str, engine: str, precision: str = "float32"
) -> float:
    from tlcli.train.extract import extract
    from tlcli.train.recipes import ExtractRecipe

    recipe = ExtractRecipe(
        backbone=backbone, size=224, weights="none", resize=resize, batch_size=batch, precision=precision
    )
    return extract(data, out, recipe, engine=engine)["seconds"]


def fresh_process_seconds(case: str, data: Path, out: Path, backbone: str, batch: int, precision: str) -> float:
    """Seconds of one case in a new Python process, as a user's command would run."""
    resize = "crop+pad" if case.startswith("default") else "crop"
    engine = "openvino" if "openvino" in case else "keras"
    precision = precision if engine == "openvino" else "float32"
    call = (
        f"b.plain_keras_extract(b.Path({str(data)!r}), {backbone!r}, {batch})"
        if case == "plain"
        else f"b.tlcli_extract(b.Path({str(data)!r}), b.Path({str(out)!r}), {backbone!r}, {batch}, {resize!r}, "
        f"{engine!r}, {precision!r})"
    )
    code = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import bench_engine as b\n"
        "import keras, tensorflow, openvino, tlcli.train.extract  # imports are not part of any timing\n"
        f"print(json.dumps({call}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    if res.returncode != 0:
        sys.exit(f"{case} failed: {res.stderr.strip()[-800:]}")
    return float(res.stdout.strip().splitlines()[-1])


def one_round(data: Path, warm: Path, work: Path, backbone: str, batch: int, precision: str) -> dict[str, float]:
    """Seconds of every case, one after another; the cached case's store is prepared outside its timing."""
    seconds = {}
    for case in CASES:
        out = work / case.replace(" ", "_").replace(",", "")
        shutil.rmtree(out, ignore_errors=True)
        if case.endswith("cached"):
            fresh_process_seconds("crop openvino", warm, out, backbone, batch, precision)
        seconds[case] = fresh_process_seconds(case, data, out, backbone, batch, precision)
        shutil.rmtree(out, ignore_errors=True)
    return seconds


def network_alone(backbone: str, batch: int, reps: int, batches: int = 4) -> dict[str, float]:
    """Images/s of the network alone on ``batches`` batches of random pixels (median of ``reps`` rounds, the four
    ways in turn each round): Keras ``predict`` (one call over all the batches, so its per-call set-up is shared as
    in an extract), tlcli's traced graph (keras engine), OpenVINO f32 (openvino engine) and OpenVINO bf16
    (openvino engine with --precision mixed_bfloat16), with bf16's relative L2 error."""
    import time

    import numpy as np

    from tlcli.models import backbones, engines, graph
    from tlcli.models.portable import features_model

    model = features_model(backbones.build(backbone, None, 224, "none"), 1, False)
    traced = graph.inference_function(model, (224, 224, 3))
    ir = engines.convert(traced)
    f32 = engines.load(ir)
    bf16 = engines.load(ir, "mixed_bfloat16")
    x = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    many = np.concatenate([x] * batches).astype(np.float32)
    ways = {
        "Keras predict": lambda: model.predict(many, batch_size=batch, verbose=0),
        "traced graph (keras engine)": lambda: [np.asarray(traced(x)) for _ in range(batches)],
        "OpenVINO f32 (openvino engine)": lambda: [f32(x) for _ in range(batches)],
        "OpenVINO bf16 (openvino engine, mixed_bfloat16)": lambda: [bf16(x) for _ in range(batches)],
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(reps + 1):
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rate = {k: batch * batches / sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}
    ref = np.asarray(traced(x))
    rate["bf16 relative L2"] = float(np.linalg.norm(bf16(x) - ref) / np.linalg.norm(ref))
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("TLCLI_SHARED", ROOT.parent / "shared"))
    parser.add_argument("--data", type=Path, default=shared / "data" / "cats_vs_dogs")
    parser.add_argument("--images", type=int, default=1000, help="Photos in all (half per class of two).")
    parser.add_argument("--backbones", default="mobilenetv2,resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=1, help="Rounds of every case (median taken).")
    parser.add_argument("--network-reps", type=int, default=3, help="Rounds of the network-alone table (0: none).")
    parser.add_argument("--network-only", action="store_true", help="Print only the network-alone table.")
    parser.add_argument(
        "--precision", default="float32", help="--precision of the openvino cases (mixed_bfloat16: OpenVINO's bf16)."
    )
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    net = Table(
        title=f"the network alone, images/s, batches of {args.batch} (load average 1 min at start "
        f"{os.getloadavg()[0]:.1f})"
    )
    for col in ("backbone", "Keras predict", "traced (keras)", "OV f32 (openvino)", "OV bf16", "bf16 rel L2"):
        net.add_column(col, justify="left" if col == "backbone" else "right")
    for backbone in args.backbones.split(",") if args.network_reps else []:
        rate = network_alone(backbone, args.batch, args.network_reps)
        net.add_row(backbone, *(f"{v:.1f}" if v > 0.1 else f"{v:.1e}" for v in rate.values()))
    if net.rows:
        Console().print(net)
    if args.network_only:
        return
    work = Path(tempfile.mkdtemp(prefix="tlcli-bench-engine-"))
    data, warm = work / "photos", work / "warm"
    n = link_dataset(args.data, data, limit=args.images // 2)
    link_dataset(args.data, warm, limit=1, skip=args.images // 2)
    loads = [f"{os.getloadavg()[0]:.1f}"]
    title = f"extract engines vs plain Keras, {n} photos, 224 px, weights none, openvino {args.precision}"
    table = Table(title=f"{title}, {os.cpu_count()} cores")
    for col in ("backbone", "case", "images/s", "x plain"):
        table.add_column(col, justify="left" if col in ("backbone", "case") else "right")
    for backbone in args.backbones.split(","):
        rounds = [one_round(data, warm, work, backbone, args.batch, args.precision) for _ in range(args.reps)]
        loads.append(f"{os.getloadavg()[0]:.1f}")
        median = {c: sorted(r[c] for r in rounds)[len(rounds) // 2] for c in CASES}
        for case in CASES:
            table.add_row(backbone, case, f"{n / median[case]:.1f}", f"{median['plain'] / median[case]:.2f}x")
        print(json.dumps({"backbone": backbone, "seconds": rounds}), file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    table.caption = f"load average (1 min) at start and after each backbone: {', '.join(loads)}; {args.reps} round(s)"
    Console().print(table)


if __name__ == "__main__":
    main()
