"""tlcli extract: a frozen backbone over a folder of photos, into a feature store."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from tlcli.cli.console import emit_json, err, handles_errors, out, progress_bar, use_device
from tlcli.cli.options import BatchOpt, ConfigOpt, DeviceOpt, JsonOpt, QuietOpt, SeedOpt, WaitOpt, _given
from tlcli.errors import UsageError


def extract_step(p: dict, progress: Callable[[int, int], None] | None) -> dict:
    """The extract step from parsed options (shared by 'tlcli extract' and 'tlcli run')."""
    from tlcli.data import datasets
    from tlcli.store import shards
    from tlcli.train import extract, recipes

    recipe = recipes.from_options(recipes.ExtractRecipe, p, fractions=datasets.parse_fractions(p["split"]))
    shard = shards.parse(p["shard"]) if p["shard"] is not None else None
    return extract.extract(p["data_dir"], p["out_dir"], recipe, shard=shard, progress=progress, wait=p["wait"])


@handles_errors
def extract_cmd(
    ctx: typer.Context,
    data_dir: Annotated[Path, typer.Argument(help="Folder of class sub-folders (optionally with split.json).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Feature store folder to write (or update).")] = Path(
        "features/default"
    ),
    backbone: Annotated[
        str, typer.Option("--backbone", "-b", help="Backbone name (see 'tlcli backbones').")
    ] = "mobilenet",
    alpha: Annotated[Optional[float], typer.Option(help="Width multiplier for MobileNet backbones.")] = None,
    size: Annotated[Optional[int], typer.Option(min=32, help="Input size in pixels (default: the backbone's).")] = None,
    weights: Annotated[
        str, typer.Option(help="'imagenet' (Keras cache or download), 'none', or a weights FILE.")
    ] = "imagenet",
    resize: Annotated[
        str,
        typer.Option(
            help="How photos become squares: crop (centre), squash, pad, or views joined by '+' "
            "whose features are concatenated (crop+pad)."
        ),
    ] = "crop+pad",
    flip: Annotated[
        bool, typer.Option("--flip/--no-flip", help="Average features of each photo and its mirror image (2x time).")
    ] = False,
    split: Annotated[
        str, typer.Option(help="train,val,test fractions when the folder has no split.json.")
    ] = "0.8,0.1,0.1",
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 32,
    precision: Annotated[
        str,
        typer.Option(
            help="Keras mixed precision for the backbone: float32, mixed_bfloat16 or mixed_float16 (for GPUs; "
            "no faster on a CPU). Vectors are stored as float32 and the precision is part of the store's key."
        ),
    ] = "float32",
    shard: Annotated[
        Optional[str],
        typer.Option(
            help="I/N, 1 <= I <= N: worker I of N (array jobs) extracts only its files, chosen by a hash of "
            "their path, into OUT/shards/I-of-N."
        ),
    ] = None,
    merge_shards: Annotated[
        bool,
        typer.Option(
            "--merge-shards",
            help="Join the N parts under OUT/shards into OUT, as an unsharded extract would write it "
            "(options come from the parts).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    wait: WaitOpt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run a frozen pre-trained backbone over every image and store one feature vector each (incremental)."""
    from tlcli.data import datasets
    from tlcli.store import shards
    from tlcli.train import extract, recipes

    if merge_shards:
        if shard is not None:
            raise UsageError("--shard runs one worker and --merge-shards joins their parts; give one of them")
        recipe = recipes.from_options(recipes.ExtractRecipe, ctx.params, fractions=datasets.parse_fractions(split))
        given = {
            f.name: getattr(recipe, f.name)
            for f in dataclasses.fields(recipe)
            if _given(ctx, recipes.param(recipes.ExtractRecipe, f.name))
        }
        summary = extract.merge_shards(data_dir, out_dir, given, wait=wait)
    else:
        if shard is not None:
            shards.parse(shard)
        use_device(device, quiet or as_json)
        with progress_bar("extracting", quiet or as_json) as bar:
            summary = extract_step(ctx.params, bar)
    if as_json:
        emit_json(summary)
        return
    s = summary["splits"]
    merged = f"merged {summary['merged']} shards: " if merge_shards else ""
    out.print(
        merged
        + f"{summary['stored']} images -> {summary['out']} ({summary['key']}): train {s['train']}, val {s['val']}, "
        f"test {s['test']}; extracted {summary['extracted']}, reused {summary['reused']}, "
        f"skipped {len(summary['skipped'])} "
        f"in {summary['seconds']:.1f}s"
    )
    if summary["replaced_key"]:
        out.print(f"replaced features made by {summary['replaced_key']}")
    for item in summary["skipped"][:20]:
        err.print(f"skipped {item['path']}: {item['reason']}", markup=False)
    if len(summary["skipped"]) > 20:
        err.print(f"... and {len(summary['skipped']) - 20} more (see {summary['out']}/meta.json)")
    if summary["empty_classes"]:
        err.print(f"ignored empty class folder(s): {', '.join(summary['empty_classes'])}", markup=False)
