"""Inference engines for a traced pixels-in graph: TensorFlow's own (``keras``) or OpenVINO, converted in memory
from the same graph and kept as IR bytes so a store can hold it and a re-run need not convert again."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np

from tlcli.errors import UsageError
from tlcli.models import devices

ENGINES = ("keras", "openvino", "auto")
ENGINE_HELP = "keras (TensorFlow), openvino (needs tlcli[openvino]) or auto"
INSTALL = "pip install 'tlcli[openvino]'"
CPU_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
"""Threads unpinned: pinned, they fight the decoding threads and other processes for the cores (MobileNetV2
extract 40 against 54 images/s on 2 busy cores)."""
HINTS = {"float32": "f32", "mixed_bfloat16": "bf16"}
"""The ``--precision`` values OpenVINO runs, as its CPU inference hint. float32 must be asked for: the plugin
otherwise runs bf16 on CPUs with avx512_bf16 or AMX (relative feature error 4e-3 on MobileNetV2, 0.1 on
MobileNet v1 0.25, held-out accuracy unchanged: bench/README.md). bf16 falls back to f32 on other CPUs."""


def installed() -> bool:
    """True when the openvino package can be imported."""
    return importlib.util.find_spec("openvino") is not None


def resolve(engine: str, precision: str = "float32", *, cached: bool = False) -> str:
    """``keras`` or ``openvino`` for an ``--engine`` value; usage error for an unknown one, a missing OpenVINO,
    or OpenVINO with a precision it does not run (float16).

    ``auto`` is OpenVINO only where its conversion is ``cached`` (extract keeps it in the store), when it is
    installed, runs the precision and TensorFlow sees no GPU (call after ``devices.select``, which a machine
    without a GPU driver needs not: there ``auto`` imports no TensorFlow); elsewhere Keras, as converting costs
    seconds a run for a few percent in float32.
    """
    name = (engine or "auto").strip().lower()
    if name not in ENGINES:
        raise UsageError(f"unknown --engine {engine!r}; use {ENGINE_HELP}")
    if name == "openvino" and not installed():
        raise UsageError(f"--engine openvino needs the openvino package: {INSTALL}")
    if name == "openvino" and precision not in HINTS:
        raise UsageError(
            f"--engine openvino runs --precision {' or '.join(HINTS)}; use --engine keras with --precision {precision}"
        )
    if name != "auto":
        return name
    if not cached or not installed() or precision not in HINTS:
        return "keras"
    return "keras" if devices.gpu_visible() else "openvino"


def version() -> str:
    """The installed OpenVINO's version, recorded beside a stored IR so another version converts again."""
    import openvino

    return openvino.get_version()


def convert(traced) -> bytes:
    """A ``graph.inference_function`` tf.function, or the GraphDef bytes ``graph.graph_bytes`` saved, as OpenVINO
    IR bytes with f32 weights."""
    import openvino as ov

    if isinstance(traced, bytes):
        import tensorflow as tf

        traced = tf.compat.v1.GraphDef.FromString(traced)
    model = ov.convert_model(traced)
    xml, weights = _ir(model)
    return _pack(xml, weights)


def _ir(model) -> tuple[bytes, bytes]:
    """An ov.Model as its IR (.xml and .bin), through a temporary folder (OpenVINO writes only files)."""
    import tempfile
    from pathlib import Path

    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="tlcli-openvino-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, xml, compress_to_fp16=False)
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


def _pack(xml: bytes, weights: bytes) -> bytes:
    """IR as one .npz (xml and bin as byte arrays), so a store holds one file for it."""
    import io

    buf = io.BytesIO()
    np.savez(buf, xml=np.frombuffer(xml, np.uint8), bin=np.frombuffer(weights, np.uint8))
    return buf.getvalue()


def load(data: bytes, precision: str = "float32") -> Callable[[np.ndarray], np.ndarray]:
    """``convert``'s bytes compiled for the CPU to compute in ``precision`` (a ``HINTS`` key): a function from a
    pixel batch to the graph's output."""
    import io

    import openvino as ov

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        xml, weights = z["xml"].tobytes(), z["bin"]
    core = ov.Core()
    model = core.read_model(xml, ov.Tensor(weights))
    bf16 = precision != "float32" and "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    hint = HINTS[precision] if bf16 else "f32"
    compiled = core.compile_model(model, "CPU", {**CPU_CONFIG, "INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()

    def run(pixels: np.ndarray) -> np.ndarray:
        return request.infer([np.ascontiguousarray(pixels)], share_inputs=True)[0].copy()

    return run
