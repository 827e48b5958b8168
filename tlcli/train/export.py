"""Export a run as a TensorFlow SavedModel serving image bytes, or a TFLite or ONNX file with its labels inside,
checked against tlcli's own predictions on the run's photos before anything is written."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from tlcli.data import images
from tlcli.errors import GateError, UsageError
from tlcli.models import serving
from tlcli.models.graph import apply_model
from tlcli.models.run import load_run
from tlcli.store import files

FORMATS = ("savedmodel", "tflite", "onnx")
QUANTIZE = ("none", "dynamic", "float16", "int8")
MIN_AGREEMENT = {"none": 0.995, "dynamic": 0.995, "float16": 0.995, "int8": 0.97}
"""Top-1 agreement with ``tlcli predict`` below which an export is refused."""
LABELS = "labels.txt"
MIN_CHECKED = 32


def check_files(meta: dict, limit: int | None = None) -> list[Path]:
    """The photos an export is checked on: the run's whole test split (at most ``limit``), topped up to
    ``MIN_CHECKED`` with other photos of its data folder when the split is smaller."""
    root = Path(meta["data_dir"])
    found = [root / rel for rel, _ in meta.get("test_files", []) if (root / rel).is_file()]
    if len(found) < MIN_CHECKED and root.is_dir():
        others = sorted(p for p in root.rglob("*") if images.is_image_name(p) and p not in found)
        found += others[: MIN_CHECKED - len(found)]
    if not found:
        raise UsageError(
            f"no images of the run's data under {root} to check the export with; is the folder still there?"
        )
    return found[:limit] if limit else found


def _savedmodel(model, meta: dict, path: Path) -> None:
    """``serving_default`` on encoded images (tf.string [batch]) and ``pixels`` on RGB pixels, labels.txt beside."""
    import keras
    import tensorflow as tf

    pixels_fn = serving.image_function(model, meta)
    archive = keras.export.ExportArchive()
    archive.track(model)
    serve_bytes = serving.bytes_function(pixels_fn, meta)
    archive.add_endpoint(
        "serving_default", lambda images: serve_bytes(images), input_signature=[tf.TensorSpec((None,), tf.string)]
    )
    archive.add_endpoint(
        "pixels",
        lambda images: serving.outputs(pixels_fn(images), list(meta["classes"])),
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)],
    )
    archive.write_out(str(path), verbose=False)
    (path / LABELS).write_text("\n".join(meta["classes"]) + "\n")


def _served(path: Path, photos: list[Path]) -> np.ndarray:
    """The SavedModel's ``serving_default`` on each photo's raw file bytes: scores in class order."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    out = [
        serve(images=tf.constant([p.read_bytes() for p in photos[i : i + 16]]))["scores"].numpy()
        for i in range(0, len(photos), 16)
    ]
    return np.concatenate(out)


def _decoded(photos: list[Path], size: int) -> list[np.ndarray]:
    """Each photo's raw bytes decoded by TensorFlow as the SavedModel decodes them, as a float32 [1, h, w, 3] batch."""
    import tensorflow as tf

    return [tf.cast(serving.decode(tf.constant(p.read_bytes()), size), tf.float32)[None].numpy() for p in photos]


def _tflite_bytes(model, meta: dict, quantize: str, representative: list[np.ndarray], work: Path) -> bytes:
    """The run as TFLite on one image [1, height, width, 3] of any size; its views resized without antialiasing,
    which TFLite lacks. Converted from a SavedModel: from a concrete function, TFLite reads the frozen
    preprocessing convolution's weights as garbage (TF 2.21)."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        serving.image_function(model, meta, antialias=False),
        input_signature=[tf.TensorSpec((1, None, None, 3), tf.float32)],
    )
    archive.write_out(str(work / "tflite-source"), verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(work / "tflite-source"))
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        converter.representative_dataset = lambda: ([x] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def _tflite_predict(model_bytes: bytes, photos: list[np.ndarray]) -> np.ndarray:
    """The TFLite model on each decoded photo at its own size."""
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's move to LiteRT is announced, not done
        interpreter = tf.lite.Interpreter(model_content=model_bytes)
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for x in photos:
        interpreter.resize_tensor_input(inp["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        results.append(interpreter.get_tensor(outp["index"])[0].astype(np.float32))
    return np.stack(results)


def _onnx_bytes(model, meta: dict) -> bytes:
    """The run as ONNX (tf2onnx, opset 18) on images [batch, height, width, 3] of one size, class names in its
    metadata as ``labels``; views resized without antialiasing, as tf2onnx has no antialiased resize."""
    import tensorflow as tf

    try:
        import tf2onnx
    except ImportError:
        raise UsageError("--format onnx needs tf2onnx and onnxruntime: pip install 'tlcli[onnx]'") from None
    signature = [tf.TensorSpec((None, None, None, 3), tf.float32, name="images")]
    fn = tf.function(serving.image_function(model, meta, antialias=False), input_signature=signature)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=signature, opset=18)
    proto.metadata_props.add(key="labels", value="\n".join(meta["classes"]))
    return proto.SerializeToString()


def _onnx_predict(model_bytes: bytes, photos: list[np.ndarray]) -> np.ndarray:
    """ONNX Runtime on each decoded photo at its own size."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x})[0] for x in photos]).astype(np.float32)


def with_labels(model_bytes: bytes, classes: list[str]) -> bytes:
    """The TFLite file with labels.txt appended as a zip archive, as TFLite Metadata packs associated files:
    the interpreter ignores it, ``zipfile.ZipFile("model.tflite").read("labels.txt")`` reads it."""
    buf = io.BytesIO(model_bytes)
    buf.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buf, "a") as archive:
        archive.writestr(LABELS, "\n".join(classes) + "\n")
    return buf.getvalue()


def _gate(exported: np.ndarray, reference: np.ndarray, quantize: str, min_agreement: float | None) -> float:
    """Top-1 agreement of the export with tlcli's predictions; GateError below the bar."""
    bar = MIN_AGREEMENT[quantize] if min_agreement is None else min_agreement
    agreement = float((exported.argmax(1) == reference.argmax(1)).mean())
    if agreement < bar:
        raise GateError(
            f"fed the photos' file bytes, the export agrees with 'tlcli predict' on top-1 for {agreement:.1%} of "
            f"{len(reference)} photos, below {bar:.1%}; nothing was written (try another --quantize)"
        )
    return agreement


def _check_options(fmt: str, quantize: str, out: Path) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise UsageError(f"unknown --quantize {quantize!r}; use one of {', '.join(QUANTIZE)}")
    if fmt != "tflite" and quantize != "none":
        raise UsageError("--quantize applies to --format tflite only")
    if out.exists() and fmt != "savedmodel" and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as model.tflite")
    if out.exists() and fmt == "savedmodel":
        raise UsageError(f"{out} already exists; remove it or choose another --out")


def _write(model, meta: dict, fmt: str, quantize: str, out: Path, photos: list[Path]) -> tuple[Path, np.ndarray]:
    """Build the export in a hidden folder beside ``out`` and run it on ``photos``: (that folder, probabilities)."""
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        if fmt == "savedmodel":
            _savedmodel(model, meta, work / "savedmodel")
            return work, _served(work / "savedmodel", photos)
        decoded = _decoded(photos, meta["input_size"])
        if fmt == "onnx":
            model_bytes = _onnx_bytes(model, meta)
            (work / "model.onnx").write_bytes(model_bytes)
            return work, _onnx_predict(model_bytes, decoded)
        model_bytes = with_labels(_tflite_bytes(model, meta, quantize, decoded[:100], work), list(meta["classes"]))
        (work / "model.tflite").write_bytes(model_bytes)
        return work, _tflite_predict(model_bytes, decoded)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _publish(work: Path, fmt: str, out: Path, classes: list[str]) -> list[str]:
    """Move the checked export into place: the SavedModel folder by rename, the TFLite file atomically."""
    if fmt == "savedmodel":
        os.rename(work / "savedmodel", out)
        return [str(out), str(out / LABELS)]
    files.write_bytes(out, (work / f"model.{fmt}").read_bytes())
    labels = out.with_suffix(".labels.txt")
    files.write_bytes(labels, ("\n".join(classes) + "\n").encode())
    return [str(out), str(labels)]


def export(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "tflite",
    quantize: str = "none",
    check_images: int | None = None,
    min_agreement: float | None = None,
) -> dict:
    """Write the run as ``fmt`` to ``out`` after checking it, fed the photos' file bytes, against ``tlcli predict``
    on the run's test split (at most ``check_images`` photos; all by default)."""
    started = time.perf_counter()
    out = Path(out)
    _check_options(fmt, quantize, out)
    model, meta, run_dir = load_run(run)
    candidates = check_files(meta, check_images)
    reference, kept, _ = apply_model(model, [str(p) for p in candidates], meta["input_size"], meta["resize"])
    photos = [candidates[i] for i in kept]
    out.parent.mkdir(parents=True, exist_ok=True)
    work, exported = _write(model, meta, fmt, quantize, out, photos)
    try:
        agreement = _gate(exported, reference, quantize, min_agreement)
        written = _publish(work, fmt, out, list(meta["classes"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "run": str(run_dir),
        "format": fmt,
        "quantize": quantize,
        "files": written,
        "bytes": sum(
            f.stat().st_size for p in map(Path, written) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()
        ),
        "checked_images": len(photos),
        "top1_agreement": round(agreement, 4),
        "max_probability_difference": round(float(np.abs(exported - reference).max()), 6),
        "mean_probability_difference": round(float(np.abs(exported - reference).mean()), 6),
        "input_shape": [1, None, None, 3] if fmt == "tflite" else [None, None, None, 3],
        "seconds": round(time.perf_counter() - started, 3),
    }
