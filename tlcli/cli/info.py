"""tlcli backbones, tlcli devices: what this installation can use."""

from __future__ import annotations

from rich.table import Table

from tlcli.cli.console import emit_json, handles_errors, native_stderr_silenced, out
from tlcli.cli.options import JsonOpt


@handles_errors
def backbones_cmd(as_json: JsonOpt = False) -> None:
    """List every registered keras.applications backbone: default input size, feature size, parameters."""
    from tlcli.models import backbones
    from tlcli.train.recipes import MEASURED_SIZES

    def measured(s) -> dict[str, int]:
        return {f"{a:g}" if a else "": size for (name, a), size in MEASURED_SIZES.items() if name == s.name}

    rows = [
        {
            "name": s.name,
            "family": s.family,
            "keras": f"keras.applications.{s.constructor}",
            "input_size": s.size,
            "measured_input_sizes": measured(s),
            "feature_dim": s.feature_dim,
            "params": s.params,
            "alphas": list(s.alphas),
            "preprocess": s.module,
        }
        for s in backbones.SPECS.values()
    ]
    if as_json:
        emit_json(rows)
        return
    table = Table(
        title="Backbones (features = pooled vector of the headless network)",
        caption="input: extract's default --size, the ImageNet size unless a larger one measured better here",
    )
    for col in ("name", "family", "input", "features", "params", "alpha"):
        table.add_column(col, justify="right" if col in ("input", "features", "params") else "left")
    for r in rows:
        sizes = [f"{size} at alpha {a}" if a else str(size) for a, size in r["measured_input_sizes"].items()]
        table.add_row(
            r["name"],
            r["family"],
            ", ".join([*sizes, f"{r['input_size']} otherwise" if sizes else str(r["input_size"])]),
            str(r["feature_dim"]),
            f"{r['params'] / 1e6:.1f}M",
            ",".join(f"{a:g}" for a in r["alphas"]),
        )
    out.print(table)


@handles_errors
def devices_cmd(as_json: JsonOpt = False) -> None:
    """List the devices TensorFlow sees (CPU, GPUs) and whether this TensorFlow build can use CUDA."""
    from tlcli.models import devices

    with native_stderr_silenced():
        info = devices.describe()
    if as_json:
        emit_json(info)
        return
    table = Table(title=f"TensorFlow {info['tensorflow']} devices (CUDA build: {info['built_with_cuda']})")
    table.add_column("device")
    table.add_column("type")
    for d in info["devices"]:
        table.add_row(d["name"], d["type"])
    out.print(table)
    out.print("--device auto uses " + ("the GPU(s)" if info["gpus"] else "the CPU (no GPU visible)"))
