"""The `tlcli adversarial` command: change a photo invisibly until the model sees another class."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tlcli.cli.console import emit_json, err, handles_errors, out, progress_bar, use_device
from tlcli.cli.options import DeviceOpt, JsonOpt, QuietOpt, SeedOpt
from tlcli.errors import EXIT_FAILURE, UsageError


@handles_errors
def adversarial_cmd(
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
    method: Annotated[str, typer.Option(help="gd (Adam + L2 penalty), fgsm (one step) or pgd (L-inf).")] = "pgd",
    eps: Annotated[float, typer.Option(help="L-inf budget in pixel levels (0-255) for pgd and fgsm.")] = 2.0,
    step: Annotated[Optional[float], typer.Option(help="PGD step in pixel levels (default eps/8, >= 0.25).")] = None,
    steps: Annotated[int, typer.Option(help="Maximum iterations (stops early on success).")] = 100,
    random_start: Annotated[bool, typer.Option(help="PGD: start from a random point in the eps-ball.")] = False,
    l2_weight: Annotated[float, typer.Option(help="gd: weight of the mean squared change.")] = 0.01,
    lr: Annotated[float, typer.Option(help="gd: Adam learning rate in pixel levels.")] = 1.0,
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
    from tlcli.data import images
    from tlcli.explain import attack
    from tlcli.models import classifier

    if (target is None) == (not untargeted):
        raise UsageError("give either --target CLASS or --untargeted")
    attack.check_options(method, eps, step, steps)
    attack.check_output(out_path)
    use_device(device, quiet or as_json)
    clf = classifier.load(backbone, alpha, weights, str(model) if model else None)
    target_index = clf.resolve(target) if target is not None else None
    try:
        pixels = images.load(image, clf.size, clf.resize)
    except images.ImageError as exc:
        raise UsageError(f"{image} is not a readable image ({exc})") from None
    except FileNotFoundError:
        raise UsageError(f"{image} does not exist") from None
    with progress_bar(f"{method} attack", quiet or as_json) as bar:
        result = attack.attack(
            clf,
            pixels,
            target_index,
            method=method,
            eps=eps,
            step=step,
            steps=steps,
            l2_weight=l2_weight,
            learning_rate=lr,
            random_start=random_start,
            seed=seed,
            progress=bar,
        )
    files = attack.write_outputs(result, out_path)
    report = {k: v for k, v in result.items() if k not in ("adversarial", "original")}
    report.update(files=files, model=clf.source, image=str(image))
    if as_json:
        emit_json(report)
    else:
        before, after = result["before"][0], result["after"][0]
        verdict = "fooled" if result["success"] else "NOT fooled"
        out.print(
            f"{verdict}: {before['class']} {before['probability']:.2f} -> {after['class']} {after['probability']:.2f} "
            f"after {result['steps']} step(s); L-inf {result['linf']:g}, L2 {result['l2']:g}, "
            f"PSNR {result['psnr_db']} dB; wrote {files['adversarial']}, {files['perturbation']}, {files['figure']}"
        )
    if not result["success"]:
        err.print(
            f"the attack did not succeed in {result['steps']} step(s); raise --eps or --steps, or try --method pgd"
        )
        raise typer.Exit(EXIT_FAILURE)
