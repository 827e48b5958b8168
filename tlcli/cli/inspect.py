"""The `tlcli ideal-image`, `tlcli features` and `tlcli adversarial` commands: what a network sees, and fooling it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tlcli.cli.console import emit_json, err, handles_errors, log, out, progress_bar, use_device
from tlcli.cli.options import DeviceOpt, JsonOpt, QuietOpt, SeedOpt
from tlcli.errors import EXIT_FAILURE, UsageError
from tlcli.explain.recipes import ATTACK, IDEAL, AttackRecipe, IdealRecipe
from tlcli.store import files

GIF_FRAMES = 30


def _check_suffix(path: Optional[Path], suffix: str, option: str) -> None:
    if path is not None and path.suffix.lower() != suffix:
        raise UsageError(f"{option} {path} must end in {suffix} (a {suffix[1:].upper()} file is written)")


@handles_errors
def ideal_image_cmd(
    *,
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
    steps: Annotated[int, typer.Option(min=1, help="Gradient ascent steps.")] = IDEAL.steps,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam step size in pixel levels (0-255).")] = IDEAL.lr,
    tv_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of the total-variation penalty (0: the noisy image).")
    ] = IDEAL.tv_weight,
    l2_weight: Annotated[float, typer.Option(min=0.0, help="Weight of an L2 pull towards mid-grey.")] = IDEAL.l2_weight,
    jitter: Annotated[int, typer.Option(min=0, help="Roll the image by up to this many pixels each step.")] = (
        IDEAL.jitter
    ),
    scale: Annotated[
        float, typer.Option(min=0.0, max=0.49, help="Zoom the image by up to this fraction each step.")
    ] = IDEAL.scale,
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
    from tlcli.explain import ideal

    _check_suffix(out_path, ".png", "--out")
    _check_suffix(gif, ".gif", "--gif")
    recipe = IdealRecipe(steps, lr, tv_weight, l2_weight, jitter, scale, seed)
    clf = _classifier(backbone, alpha, weights, model, device=device, quiet=quiet or as_json)
    index = clf.resolve(target)
    log(f"ideal image of {clf.classes[index]!r} for {clf.source}", quiet or as_json)
    with progress_bar("ideal image (steps)", quiet or as_json) as bar:
        every = max(1, steps // GIF_FRAMES) if gif else None
        result = ideal.ideal_image(clf, index, recipe.check(), progress=bar, gif_every=every)
    summary = _save_ideal(result, clf.source, out_path=out_path, gif=gif, upscale=upscale)
    if as_json:
        emit_json(summary)
    else:
        _print_ideal(summary)


def _classifier(backbone: Optional[str], alpha, weights: str, model: Optional[Path], *, device: str, quiet: bool):
    """The classifier ideal-image or adversarial asked for, on the chosen device: a trained run or a backbone."""
    from tlcli.models import classifier

    if model is not None and (backbone or alpha is not None or weights != "imagenet"):
        raise UsageError("give either --model RUN or --backbone/--alpha/--weights, not both")
    use_device(device, quiet)
    return classifier.load(backbone, alpha, weights, str(model) if model else None)


def _save_ideal(result: dict, source: str, *, out_path: Path, gif: Optional[Path], upscale: int) -> dict:
    """Write the PNG (and GIF), enlarged ``upscale`` times; the summary ideal-image prints."""
    from tlcli.explain import ideal

    files.write_bytes(out_path, _png(ideal.upscale(result["image"], upscale)))
    if gif:
        files.write_bytes(gif, ideal.gif_bytes(result["frames"], upscale))
    summary = {k: v for k, v in result.items() if k not in ("image", "frames")}
    summary.update(
        model=source,
        out=str(out_path),
        gif=str(gif) if gif else None,
        gif_frames=len(result["frames"]) if gif else 0,
        upscale=upscale,
        total_variation=round(result["total_variation"], 4),
        probability=round(result["probability"], 4),
    )
    return summary


def _png(image) -> bytes:
    from tlcli.data import images

    return images.png_bytes(image)


def _print_ideal(summary: dict) -> None:
    table = Table(title=f"top-5 of the ideal {summary['target']}")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for row in summary["top"]:
        table.add_row(row["class"], f"{row['probability']:.4f}")
    out.print(table)
    gif = f", {summary['gif']} ({summary['gif_frames']} frames)" if summary["gif"] else ""
    out.print(
        f"{summary['target']}: probability {summary['probability']:.4f} after {summary['steps']} steps "
        f"({summary['seconds']:.1f}s); total variation {summary['total_variation']:.2f} -> {summary['out']}{gif}",
        markup=False,
    )


def _default_layer(layers: list[dict]) -> str:
    names = [row["name"] for row in layers]
    return "block3_conv3" if "block3_conv3" in names else names[len(names) // 2]


@handles_errors
def features_cmd(
    *,
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
    from tlcli.explain import feature_maps
    from tlcli.models import backbones

    _check_suffix(out_path, ".png", "--out")
    sp = backbones.spec(backbone)
    pixels = None if list_layers else _photo(image, size or sp.size)
    use_device(device, quiet or as_json)
    began = time.perf_counter()
    bb = backbones.build(backbone, alpha, size, weights, pooling=None)
    layers = feature_maps.list_layers(bb.model)
    if list_layers:
        _print_layers(layers, bb.key, as_json)
        return
    grid = feature_maps.feature_grid(bb, layer or _default_layer(layers), pixels, channels)
    files.write_bytes(out_path, _png(grid["image"]))
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


def _photo(image: Optional[Path], size: int):
    """The photo features looks at, centre-cropped to ``size``; none or an unreadable one is a usage error."""
    from tlcli.data import images

    if image is None:
        raise UsageError("give an IMAGE to look at (or --list-layers)")
    try:
        return images.load(image, size, "crop")
    except images.ImageError as exc:
        raise UsageError(f"{image} is not a readable image ({exc}); give a JPEG, PNG, ...") from None


def _print_layers(layers: list[dict], key: str, as_json: bool) -> None:
    if as_json:
        emit_json(layers)
        return
    table = Table(title=f"layers of {key} with feature maps")
    for col in ("name", "type", "output shape"):
        table.add_column(col)
    for row in layers:
        table.add_row(row["name"], row["type"], " x ".join(map(str, row["shape"])))
    out.print(table)


@handles_errors
def adversarial_cmd(
    *,
    image: Annotated[Path, typer.Argument(help="The photo to perturb.")],
    target: Annotated[
        Optional[str],
        typer.Option(
            "--target", "-t", help="Class to reach: ImageNet name, WordNet id or index, or a class of --model."
        ),
    ] = None,
    untargeted: Annotated[bool, typer.Option("--untargeted", help="Any class but the current top-1 will do.")] = False,
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="ImageNet backbone with its 1000-class top.")] = (
        "mobilenet"
    ),
    alpha: Annotated[Optional[float], typer.Option(help="Width multiplier for MobileNet backbones.")] = None,
    weights: Annotated[str, typer.Option(help="'imagenet', 'none', or a weights FILE with the top.")] = "imagenet",
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Attack a trained run instead.")] = None,
    method: Annotated[str, typer.Option(help="gd (Adam + L2 penalty), fgsm (one step) or pgd (L-inf).")] = (
        ATTACK.method
    ),
    eps: Annotated[float, typer.Option(help="L-inf budget in pixel levels (0-255) for pgd and fgsm.")] = ATTACK.eps,
    step: Annotated[Optional[float], typer.Option(help="PGD step in pixel levels (default eps/8, >= 0.25).")] = None,
    steps: Annotated[int, typer.Option(help="Maximum iterations (stops early on success).")] = ATTACK.steps,
    random_start: Annotated[bool, typer.Option(help="PGD: start from a random point in the eps-ball.")] = (
        ATTACK.random_start
    ),
    l2_weight: Annotated[float, typer.Option(help="gd: weight of the mean squared change.")] = ATTACK.l2_weight,
    lr: Annotated[float, typer.Option(help="gd: Adam learning rate in pixel levels.")] = ATTACK.learning_rate,
    out_path: Annotated[
        Path,
        typer.Option("--out", "-o", help="Adversarial PNG; -perturbation.png and -figure.png are written beside it."),
    ] = Path("adversarial.png"),
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Nudge a photo (within --eps pixel levels) until the network calls it --target; write PNGs and a report."""
    from tlcli.explain import attack

    if (target is None) == (not untargeted):
        raise UsageError("give either --target CLASS or --untargeted")
    recipe = AttackRecipe(method, eps, step, steps, l2_weight, lr, random_start, seed).check()
    attack.check_output(out_path)
    use_device(device, quiet or as_json)
    clf = _attack_model(backbone, alpha, weights, model)
    target_index = clf.resolve(target) if target is not None else None
    pixels = _attack_photo(image, clf)
    with progress_bar(f"{method} attack", quiet or as_json) as bar:
        result = attack.attack(clf, pixels, target_index, recipe, progress=bar)
    written = attack.write_outputs(result, out_path)
    report = {k: v for k, v in result.items() if k not in ("adversarial", "original")}
    report.update(files=written, model=clf.source, image=str(image))
    if as_json:
        emit_json(report)
    else:
        _print_attack(report)
    if not result["success"]:
        err.print(
            f"the attack did not succeed in {result['steps']} step(s); raise --eps or --steps, or try --method pgd"
        )
        raise typer.Exit(EXIT_FAILURE)


def _attack_model(backbone: str, alpha: Optional[float], weights: str, model: Optional[Path]):
    from tlcli.models import classifier

    return classifier.load(backbone, alpha, weights, str(model) if model else None)


def _attack_photo(image: Path, clf):
    """The photo at the model's input size, as the model's own resize makes it; one-line errors otherwise."""
    from tlcli.data import images

    try:
        return images.load(image, clf.size, clf.resize)
    except images.ImageError as exc:
        raise UsageError(f"{image} is not a readable image ({exc})") from None
    except FileNotFoundError:
        raise UsageError(f"{image} does not exist") from None


def _print_attack(report: dict) -> None:
    before, after, written = report["before"][0], report["after"][0], report["files"]
    verdict = "fooled" if report["success"] else "NOT fooled"
    out.print(
        f"{verdict}: {before['class']} {before['probability']:.2f} -> {after['class']} {after['probability']:.2f} "
        f"after {report['steps']} step(s); L-inf {report['linf']:g}, L2 {report['l2']:g}, "
        f"PSNR {report['psnr_db']} dB; wrote {written['adversarial']}, {written['perturbation']}, {written['figure']}"
    )
