"""Device choice through TensorFlow device placement: which GPUs TensorFlow may see, with memory growth."""

from __future__ import annotations

import os
import re
import sys

from tlcli.errors import UsageError

DEVICE_HELP = "auto (a GPU if TensorFlow sees one, else CPU), cpu, gpu (all GPUs) or gpu:N"
GPU_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
"""Device nodes of the drivers TensorFlow reaches GPUs through on Linux: NVIDIA's, ROCm's, WSL's."""


def gpu_possible() -> bool:
    """Whether TensorFlow could see a GPU here, known without importing it (seconds): on Linux not without a
    GPU driver's device node; elsewhere assumed possible."""
    return not sys.platform.startswith("linux") or any(os.path.exists(node) for node in GPU_NODES)


def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU (after ``select``); imports TensorFlow only where one is possible."""
    if not gpu_possible():
        return False
    import tensorflow as tf

    return bool(tf.config.get_visible_devices("GPU"))


def describe() -> dict:
    """What TensorFlow sees: physical devices, and whether this build can use CUDA GPUs at all."""
    import tensorflow as tf

    physical = [{"name": d.name, "type": d.device_type} for d in tf.config.list_physical_devices()]
    build = tf.sysconfig.get_build_info()
    return {
        "devices": physical,
        "gpus": sum(d["type"] == "GPU" for d in physical),
        "built_with_cuda": bool(tf.test.is_built_with_cuda()),
        "cuda_version": build.get("cuda_version"),
        "cudnn_version": build.get("cudnn_version"),
        "tensorflow": tf.__version__,
    }


def _set_visible(chosen: list, gpus: list) -> None:
    import tensorflow as tf

    try:
        tf.config.set_visible_devices(chosen, "GPU")
        for gpu in chosen:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        if gpus:  # already initialised in this process (library use); nothing to hide when there is no GPU
            raise UsageError(
                "TensorFlow's devices were already initialised in this process; choose --device first"
            ) from None


def parse(device: str) -> tuple[str, str | None]:
    """A ``--device`` value as its kind (auto, cpu or gpu) and GPU index (None for all); usage error for others."""
    match = re.fullmatch(r"(auto|cpu|gpu)(?::(\d+))?", (device or "auto").strip().lower())
    if not match or (match.group(2) is not None and match.group(1) != "gpu"):
        raise UsageError(f"--device {device!r} is not one of {DEVICE_HELP}")
    return match.group(1), match.group(2)


def select(device: str = "auto") -> dict:
    """Make only the requested devices visible to TensorFlow (call before any op runs).

    ``gpu`` and ``gpu:N`` on a machine without that GPU are a usage error; ``auto`` falls back to
    the CPU and says so in the returned ``note``.
    """
    import tensorflow as tf

    kind, index = parse(device)
    gpus = tf.config.list_physical_devices("GPU")
    if kind == "cpu" or (kind == "auto" and not gpus):
        _set_visible([], gpus)
        note = "no GPU visible to TensorFlow; running on the CPU" if kind == "auto" else None
        return {"device": "cpu", "note": note}
    if not gpus:
        raise UsageError(
            f"--device {device}: TensorFlow sees no GPU on this machine (CUDA build: {tf.test.is_built_with_cuda()}); "
            "use --device cpu or auto, or install tensorflow[and-cuda] on a machine with an NVIDIA GPU"
        )
    chosen = gpus
    if index is not None:
        if int(index) >= len(gpus):
            raise UsageError(f"--device {device}: only {len(gpus)} GPU(s) visible (gpu:0 to gpu:{len(gpus) - 1})")
        chosen = [gpus[int(index)]]
    _set_visible(chosen, gpus)
    return {"device": ",".join(g.name.replace("/physical_device:", "") for g in chosen), "note": None}
