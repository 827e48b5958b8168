"""The `tlcli ideal-image` and `tlcli features` commands: what a network sees."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tlcli.cli.console import emit_json, err, handles_errors, log, out, progress_bar, use_device
from tlcli.cli.options import DeviceOpt, JsonOpt, QuietOpt, SeedOpt
from tlcli.errors import UsageError
from tlcli.explain import ideal
from tlcli.store import files

GIF_FRAMES = 30


def _check_suffix(path: Optional[Path], suffix: str, option: str) -> None:
    if path is not None and path.suffix.lower() != suffix:
        raise UsageError(f"{option} {path} must end in {suffix} (a {suffix[1:].upper()} file is written)")


@handles_errors
def ideal_image_cmd(
    target: Annotated[
        str, typer.Argument(help="Class to dream up: ImageNet name, WordNet id or index, or a class of --model.")
    ],
    backbone: Annotated[
        Optional[str], typer.Option("--backbone", "-b", help="Backbone with its ImageNet top (default mobilenet).")
    ] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Width multiplier for MobileNet backbones.")] = None,
    weights: Annotated[
        str, typer.Option(help="'imagenet' (Keras cache or download) or a with-top weights FILE.")
    ] = "imagenet",
    model: Annotated[
        Optional[Path], typer.Option("--model", "-m", help="A trained run (e.g. runs/pets/latest) instead.")
    ] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("ideal.png"),
    gif: Annotated[Optional[Path], typer.Option(help="Also write a looping GIF of the optimisation.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Gradient ascent steps.")] = ideal.DEFAULT_STEPS,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam step size in pixel levels (0-255).")] = ideal.DEFAULT_LR,
    tv_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of the total-variation penalty (0: the noisy image).")
    ] = ideal.DEFAULT_TV_WEIGHT,
    l2_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of an L2 pull towards mid-grey.")
    ] = ideal.DEFAULT_L2_WEIGHT,
    jitter: Annotated[
        int, typer.Option(min=0, help="Roll the image by up to this many pixels each step.")
    ] = ideal.DEFAULT_JITTER,
    scale: Annotated[
        float, typer.Option(min=0.0, max=0.49, help="Zoom the image by up to this fraction each step.")
    ] = ideal.DEFAULT_SCALE,
    upscale: Annotated[int, typer.Option(min=1, max=16, help="Enlarge the written images N times.")] = 1,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Gradient ascent from random noise to the image a model finds most typical of CLASS.

    Maximises the class log-probability minus a total-variation penalty (smoothness); prints the
    final probability of CLASS and the top-5, and writes the PNG at the model's input size.
    """
    from tlcli.data import images
    from tlcli.models import classifier

    _check_suffix(out_path, ".png", "--out")
    _check_suffix(gif, ".gif", "--gif")
    if model is not None and (backbone or alpha is not None or weights != "imagenet"):
        raise UsageError("give either --model RUN or --backbone/--alpha/--weights, not both")
    use_device(device, quiet or as_json)
    clf = classifier.load(backbone, alpha, weights, str(model) if model else None)
    index = clf.resolve(target)
    log(f"ideal image of {clf.classes[index]!r} for {clf.source}", quiet or as_json)
    with progress_bar("ideal image (steps)", quiet or as_json) as bar:
        result = ideal.ideal_image(
            clf,
            index,
            steps=steps,
            lr=lr,
            tv_weight=tv_weight,
            l2_weight=l2_weight,
            jitter=jitter,
            scale=scale,
            seed=seed,
            progress=bar,
            gif_every=max(1, steps // GIF_FRAMES) if gif else None,
        )
    files.write_bytes(out_path, images.png_bytes(ideal.upscale(result["image"], upscale)))
    if gif:
        files.write_bytes(gif, ideal.gif_bytes(result["frames"], upscale))
    summary = {k: v for k, v in result.items() if k not in ("image", "frames")}
    summary.update(
        model=clf.source,
        out=str(out_path),
        gif=str(gif) if gif else None,
        gif_frames=len(result["frames"]) if gif else 0,
        upscale=upscale,
        total_variation=round(result["total_variation"], 4),
        probability=round(result["probability"], 4),
    )
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"top-5 of the ideal {summary['target']}")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for row in summary["top"]:
        table.add_row(row["class"], f"{row['probability']:.4f}")
    out.print(table)
    out.print(
        f"{summary['target']}: probability {summary['probability']:.4f} after {steps} steps "
        f"({summary['seconds']:.1f}s); total variation {summary['total_variation']:.2f} -> {out_path}"
        + (f", {gif} ({summary['gif_frames']} frames)" if gif else ""),
        markup=False,
    )


def _default_layer(layers: list[dict]) -> str:
    names = [row["name"] for row in layers]
    return "block3_conv3" if "block3_conv3" in names else names[len(names) // 2]


@handles_errors
def features_cmd(
    image: Annotated[Optional[Path], typer.Argument(help="The photo to look at.")] = None,
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Backbone name (see 'tlcli backbones').")] = "vgg16",
    alpha: Annotated[Optional[float], typer.Option(help="Width multiplier for MobileNet backbones.")] = None,
    weights: Annotated[
        str, typer.Option(help="'imagenet' (Keras cache or download), 'none', or a weights FILE.")
    ] = "imagenet",
    layer: Annotated[
        Optional[str],
        typer.Option(help="Layer to show (see --list-layers; default block3_conv3, else a middle layer)."),
    ] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="PNG grid to write.")] = Path("features.png"),
    channels: Annotated[int, typer.Option(min=1, max=256, help="How many of the strongest channels.")] = 16,
    size: Annotated[Optional[int], typer.Option(min=32, help="Input size in pixels (default: the backbone's).")] = None,
    list_layers: Annotated[
        bool, typer.Option("--list-layers", help="List the layers with feature maps and their shapes.")
    ] = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Grid of the strongest feature maps (by mean activation) of one layer for one photo, beside the photo."""
    from tlcli.data import images
    from tlcli.models import backbones

    _check_suffix(out_path, ".png", "--out")
    sp = backbones.spec(backbone)
    pixels = None
    if not list_layers:
        if image is None:
            raise UsageError("give an IMAGE to look at (or --list-layers)")
        try:
            pixels = images.load(image, size or sp.size, "crop")
        except images.ImageError as exc:
            raise UsageError(f"{image} is not a readable image ({exc}); give a JPEG, PNG, ...") from None
    use_device(device, quiet or as_json)
    began = time.perf_counter()
    bb = backbones.build(backbone, alpha, size, weights, pooling=None)
    layers = ideal.list_layers(bb.model)
    if list_layers:
        if as_json:
            emit_json(layers)
            return
        table = Table(title=f"layers of {bb.key} with feature maps")
        for col in ("name", "type", "output shape"):
            table.add_column(col)
        for row in layers:
            table.add_row(row["name"], row["type"], " x ".join(map(str, row["shape"])))
        out.print(table)
        return
    name = layer or _default_layer(layers)
    grid = ideal.feature_grid(bb, name, pixels, channels)
    files.write_bytes(out_path, images.png_bytes(grid["image"]))
    summary = {
        "image": str(image),
        "model": bb.key,
        "layer": grid["layer"],
        "shape": grid["shape"],
        "channels": grid["channels"],
        "out": str(out_path),
        "grid_size": [int(grid["image"].shape[1]), int(grid["image"].shape[0])],
        "seconds": round(time.perf_counter() - began, 3),
    }
    if as_json:
        emit_json(summary)
        return
    h, w, c = grid["shape"]
    shown = ", ".join(str(row["channel"]) for row in grid["channels"])
    out.print(
        f"{grid['layer']} of {bb.key} ({h}x{w}x{c}): the photo and {len(grid['channels'])} strongest channels "
        f"({shown}) -> {out_path}",
        markup=False,
    )
    if bb.weights == "none":
        err.print("note: --weights none shows random filters, not learned ones", markup=False)
