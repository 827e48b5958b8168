"""tlcli extract: a frozen backbone over a folder of photos, into a feature store."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from tlcli.cli.console import deferred_device, emit_json, err, handles_errors, out, progress_bar
from tlcli.cli.options import (
    BatchOpt,
    ConfigOpt,
    DeviceOpt,
    EngineOpt,
    JsonOpt,
    NoLockOpt,
    QuietOpt,
    SeedOpt,
    WaitOpt,
    _given,
    locking,
)
from tlcli.errors import UsageError

DataDirArg = Annotated[Path, typer.Argument(help="Folder of class sub-folders (optionally with split.json).")]
StoreOpt = Annotated[Path, typer.Option("--out", "-o", help="Feature store folder to write (or update).")]
BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="Backbone name (see 'tlcli backbones').")]
AlphaOpt = Annotated[Optional[float], typer.Option(help="Width multiplier for MobileNet backbones.")]
SizeOpt = Annotated[Optional[int], typer.Option(min=32, help="Input size in pixels (default: the backbone's).")]
WeightsOpt = Annotated[str, typer.Option(help="'imagenet' (Keras cache or download), 'none', or a weights FILE.")]
ResizeOpt = Annotated[
    str,
    typer.Option(
        help="How photos become squares: crop (centre), squash, pad, or views joined by '+' "
        "whose features are concatenated (crop+pad)."
    ),
]
FlipOpt = Annotated[
    bool, typer.Option("--flip/--no-flip", help="Average features of each photo and its mirror image (2x time).")
]
SplitOpt = Annotated[str, typer.Option(help="train,val,test fractions when the folder has no split.json.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help="Keras mixed precision for the backbone: float32, mixed_bfloat16 or mixed_float16 (for GPUs; "
        "no faster on a CPU; with --engine openvino, mixed_bfloat16 is OpenVINO's bf16, about 2x on CPUs that "
        "have it). Vectors are stored as float32 and the precision is part of the store's key."
    ),
]
ShardOpt = Annotated[
    Optional[str],
    typer.Option(
        help="I/N, 1 <= I <= N: worker I of N (array jobs) extracts only its files, chosen by a hash of "
        "their path, into OUT/shards/I-of-N."
    ),
]
MergeShardsOpt = Annotated[
    bool,
    typer.Option(
        "--merge-shards",
        help="Join the N parts under OUT/shards into OUT, as an unsharded extract would write it "
        "(options come from the parts).",
    ),
]


def extract_step(
    p: dict, progress: Callable[[int, int], None] | None, before_tensorflow: Callable[[], object] | None = None
) -> dict:
    """The extract step from parsed options (shared by 'tlcli extract' and 'tlcli run')."""
    from tlcli.data import datasets
    from tlcli.store import shards
    from tlcli.train import extract, recipes

    recipe = recipes.from_options(recipes.ExtractRecipe, p, fractions=datasets.parse_fractions(p["split"]))
    shard = shards.parse(p["shard"]) if p["shard"] is not None else None
    return extract.extract(
        p["data_dir"],
        p["out_dir"],
        recipe,
        shard=shard,
        progress=progress,
        wait=p["wait"],
        engine=p["engine"],
        before_tensorflow=before_tensorflow,
    )


def _merge_step(ctx: typer.Context) -> dict:
    """--merge-shards from parsed options; only the options given are checked against the parts'."""
    from tlcli.data import datasets
    from tlcli.train import extract, recipes

    p = ctx.params
    if p["shard"] is not None:
        raise UsageError("--shard runs one worker and --merge-shards joins their parts; give one of them")
    recipe = recipes.from_options(recipes.ExtractRecipe, p, fractions=datasets.parse_fractions(p["split"]))
    given = {
        f.name: getattr(recipe, f.name)
        for f in dataclasses.fields(recipe)
        if _given(ctx, recipes.param(recipes.ExtractRecipe, f.name))
    }
    return extract.merge_shards(p["data_dir"], p["out_dir"], given, wait=p["wait"])


def _print_summary(summary: dict) -> None:
    """One line of counts on stdout; replaced features, skipped files and empty classes on stderr."""
    s = summary["splits"]
    merged = f"merged {summary['merged']} shards: " if "merged" in summary else ""
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


@handles_errors
def extract_cmd(
    ctx: typer.Context,
    *,
    data_dir: DataDirArg,
    out_dir: StoreOpt = Path("features/default"),
    backbone: BackboneOpt = "mobilenet",
    alpha: AlphaOpt = None,
    size: SizeOpt = None,
    weights: WeightsOpt = "imagenet",
    resize: ResizeOpt = "crop+pad",
    flip: FlipOpt = False,
    split: SplitOpt = "0.8,0.1,0.1",
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 32,
    precision: PrecisionOpt = "float32",
    shard: ShardOpt = None,
    merge_shards: MergeShardsOpt = False,
    as_json: JsonOpt = False,
    wait: WaitOpt = False,
    no_lock: NoLockOpt = False,
    device: DeviceOpt = "auto",
    engine: EngineOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run a frozen pre-trained backbone over every image and store one feature vector each (incremental)."""
    from tlcli.store import shards

    locking(no_lock)
    if merge_shards:
        summary = _merge_step(ctx)
    else:
        if shard is not None:
            shards.parse(shard)
        choose = deferred_device(device, quiet or as_json)
        with progress_bar("extracting", quiet or as_json) as bar:
            summary = extract_step(ctx.params, bar, choose)
    if as_json:
        emit_json(summary)
    else:
        _print_summary(summary)
