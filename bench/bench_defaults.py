"""How extract's defaults were chosen: cross-validated accuracy per cost of input sizes and views, on every set.

    .venv/bin/python bench/bench_defaults.py [--sets cats_vs_dogs,flowers,oxford_pets] [--sizes 224,320]
        [--resize crop,crop+pad] [--folds 10]

For each set of ``../shared/data`` and each recipe (MobileNet v1 0.25, the offline ImageNet weights; every
other option at its default), extracts a store into a temp folder and runs ``tlcli cross-validate`` on it:
prints the pooled accuracy over every photo, the folds' spread (standard deviation) and the extract's
seconds per 1,000 photos. The default is the recipe with the best accuracy on all sets unless a cheaper
one is within the folds' spread.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("TLCLI_SHARED", ROOT.parent / "shared"))
    parser.add_argument("--data", type=Path, default=shared / "data")
    parser.add_argument("--sets", default="cats_vs_dogs,flowers,oxford_pets")
    parser.add_argument("--sizes", default="224,320")
    parser.add_argument("--resize", default="crop,crop+pad")
    parser.add_argument("--folds", type=int, default=10)
    args = parser.parse_args()

    from tlcli.train.crossval import cross_validate
    from tlcli.train.extract import extract
    from tlcli.train.recipes import ExtractRecipe

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            for size in map(int, args.sizes.split(",")):
                for resize in args.resize.split(","):
                    store = Path(tmp) / f"{name}-{size}-{resize}"
                    recipe = ExtractRecipe(alpha=0.25, size=size, resize=resize)
                    done = extract(args.data / name, store, recipe, engine="keras")
                    cv = cross_validate(store, folds=args.folds)
                    per_k = 1000 * done["seconds"] / done["stored"]
                    rows.append((name, size, resize, cv["accuracy"], cv["fold_std"], cv["n"], per_k))
                    print(f"{name} {size} {resize}: {cv['accuracy']:.4f} +-{cv['fold_std']:.3f}", flush=True)
    print(f"\n| set | input | views | {args.folds}-fold accuracy | folds' std | photos | extract s / 1,000 photos |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, size, resize, acc, std, n, per_k in rows:
        print(f"| {name} | {size} | {resize} | {acc:.4f} | {std:.3f} | {n} | {per_k:.1f} |")


if __name__ == "__main__":
    main()
