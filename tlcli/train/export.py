"""Export a run's pixels-in model as a TensorFlow SavedModel or a TFLite file, checked against Keras."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from tlcli.data import images
from tlcli.errors import GateError, UsageError
from tlcli.models.run import load_run
from tlcli.store import files

FORMATS = ("savedmodel", "tflite")
QUANTIZE = ("none", "dynamic", "float16", "int8")


def _sample_pixels(meta: dict, n: int) -> np.ndarray:
    """Up to ``n`` decodable images of the run's data (test split first) as model input."""
    root = Path(meta["data_dir"])
    candidates = [root / rel for rel, _ in meta.get("test_files", [])]
    if len(candidates) < n and root.is_dir():
        candidates += sorted(p for p in root.rglob("*") if images.is_image_name(p))[: 4 * n]
    pixels = []
    for path in dict.fromkeys(p.resolve() for p in candidates):
        try:
            pixels.append(images.load(path, meta["input_size"], meta["resize"]))
        except (images.ImageError, OSError):
            continue
        if len(pixels) == n:
            break
    if not pixels:
        raise UsageError(
            f"no images of the run's data under {root} to check the export with; is the folder still there?"
        )
    return np.stack(pixels).astype(np.float32)


def _tflite_bytes(saved_model: Path, quantize: str, representative: np.ndarray) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        converter.representative_dataset = lambda: ([x[None]] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def _tflite_predict(model_bytes: bytes, pixels: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's move to LiteRT is announced, not done
        interpreter = tf.lite.Interpreter(model_content=model_bytes)
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], (1, *pixels.shape[1:]))
    interpreter.allocate_tensors()
    results = []
    for x in pixels:
        value = x[None]
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            value = np.clip(np.round(value / scale + zero), np.iinfo(inp["dtype"]).min, np.iinfo(inp["dtype"]).max)
        interpreter.set_tensor(inp["index"], value.astype(inp["dtype"]))
        interpreter.invoke()
        out = interpreter.get_tensor(outp["index"]).astype(np.float32)
        if outp["dtype"] != np.float32:
            scale, zero = outp["quantization"]
            out = (out - zero) * scale
        results.append(out[0])
    return np.stack(results)


MIN_AGREEMENT = {"none": 0.99, "dynamic": 0.99, "float16": 0.99, "int8": 0.9}


def _gate(exported: np.ndarray, reference: np.ndarray, quantize: str, min_agreement: float | None) -> None:
    bar = MIN_AGREEMENT[quantize] if min_agreement is None else min_agreement
    agreement = float((exported.argmax(1) == reference.argmax(1)).mean())
    if agreement < bar:
        raise GateError(
            f"the exported model agrees with the Keras model on top-1 for {agreement:.1%} of the check images, "
            f"below {bar:.0%}; nothing was written (try another --quantize)"
        )


def export(
    run: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "tflite",
    quantize: str = "none",
    check_images: int = 32,
    min_agreement: float | None = None,
) -> dict:
    """Write the run's model as ``fmt`` to ``out`` (labels beside it) after checking it agrees with Keras."""
    import tensorflow as tf

    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise UsageError(f"unknown --quantize {quantize!r}; use one of {', '.join(QUANTIZE)}")
    if fmt == "savedmodel" and quantize != "none":
        raise UsageError("--quantize applies to --format tflite only")
    started = time.perf_counter()
    model, meta, run_dir = load_run(run)
    out = Path(out)
    if out.exists() and fmt == "tflite" and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as model.tflite")
    pixels = _sample_pixels(meta, check_images)
    reference = model.predict(pixels, verbose=0, batch_size=16)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        saved = work / "savedmodel"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        if fmt == "savedmodel":
            loaded = tf.saved_model.load(str(saved))
            exported = np.concatenate(
                [loaded.serve(tf.constant(pixels[i : i + 16])).numpy() for i in range(0, len(pixels), 16)]
            )
            if out.exists():
                raise UsageError(f"{out} already exists; remove it or choose another --out")
            _gate(exported, reference, quantize, min_agreement)
            (saved / "labels.txt").write_text("\n".join(meta["classes"]) + "\n")
            os.rename(saved, out)
            written = [str(out), str(out / "labels.txt")]
        else:
            model_bytes = _tflite_bytes(saved, quantize, pixels)
            exported = _tflite_predict(model_bytes, pixels)
            _gate(exported, reference, quantize, min_agreement)
            files.write_bytes(out, model_bytes)
            labels = out.with_suffix(".labels.txt")
            files.write_bytes(labels, ("\n".join(meta["classes"]) + "\n").encode())
            written = [str(out), str(labels)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    agreement = float((exported.argmax(1) == reference.argmax(1)).mean())
    return {
        "run": str(run_dir),
        "format": fmt,
        "quantize": quantize,
        "files": written,
        "bytes": sum(Path(p).stat().st_size for p in written if Path(p).is_file())
        + sum(f.stat().st_size for p in written if Path(p).is_dir() for f in Path(p).rglob("*") if f.is_file()),
        "checked_images": len(pixels),
        "top1_agreement": round(agreement, 4),
        "max_probability_difference": round(float(np.abs(exported - reference).max()), 6),
        "input_shape": list(pixels.shape[1:]),
        "seconds": round(time.perf_counter() - started, 3),
    }
