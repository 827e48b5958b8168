"""Layouts: turn an unpacked archive or a user's folder into ``<class>/<image>`` folders, and the official
Oxford-IIIT Pet lists into a train/val/test split."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from tlcli.data import datasets, images
from tlcli.errors import UsageError

OXFORD_VAL_FRACTION = 0.1


def _visible(entries: Iterator[os.DirEntry]) -> list[os.DirEntry]:
    return [e for e in entries if not e.name.startswith(".") and e.name != "__MACOSX"]


def class_root(folder: str | os.PathLike) -> Path:
    """The folder whose sub-folders are the classes: ``folder`` itself, or below single wrapper folders."""
    folder = Path(folder)
    visited = set()
    while True:
        key = (folder.stat().st_dev, folder.stat().st_ino)
        if key in visited:
            raise UsageError(f"{folder} links back to a folder above it, so the folder never ends; remove that link")
        visited.add(key)
        with os.scandir(folder) as it:
            entries = _visible(it)
        dirs = [e for e in entries if e.is_dir()]
        if len(dirs) == 1 and not any(e.is_file() and images.is_image_name(e.name) for e in entries):
            folder = Path(dirs[0].path)
            continue
        return folder


def _class_dirs(root: Path) -> list[Path]:
    with os.scandir(root) as it:
        return sorted(Path(e.path) for e in _visible(it) if e.is_dir())


def copy_folder(src: Path, out: Path) -> None:
    """Copy (never move) the class folders of a user's folder into ``out``: each real file once, links followed
    (a link that loops is a usage error), links that lead nowhere left out."""
    root = class_root(src)
    out.mkdir(parents=True, exist_ok=True)
    for name, rels in datasets.class_files(root).items():
        if name == "__MACOSX":
            continue
        (out / name).mkdir()
        for rel in rels:
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                shutil.copy2(root / rel, target)


def class_folders(raw: Path, out: Path, *, lowercase: bool) -> None:
    """Move the class folders found in ``raw`` to ``out/<class>``."""
    root = class_root(raw)
    out.mkdir(parents=True, exist_ok=True)
    for d in _class_dirs(root):
        target = out / (d.name.lower() if lowercase else d.name)
        if target.exists():
            raise UsageError(f"two class folders map to {target.name!r}; rename one of them")
        os.rename(d, target)


def _read_pet_list(path: Path) -> list[tuple[str, int | None]]:
    """(file stem, species: 1 cat / 2 dog) per line of an Oxford-IIIT Pet trainval.txt/test.txt."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        species = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None
        rows.append((parts[0], species))
    return rows


def _find_file(raw: Path, name: str) -> Path:
    found = sorted(raw.rglob(name), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise UsageError(f"the downloaded archives hold no {name}; they are not the expected Oxford-IIIT Pet files")
    return found[0]


def _pet_class(stem: str, species: int | None, labels: str) -> str:
    """The class of one listed pet photo: its breed, or cat/dog (from the list, else the breed's capital)."""
    breed = re.sub(r"_\d+$", "", stem)
    if labels != "species":
        return breed
    cat = species == 1 if species in (1, 2) else breed[:1].isupper()
    return "cat" if cat else "dog"


def oxford(raw: Path, out: Path, labels: str) -> tuple[dict[str, list[str]], list[dict]]:
    """Move listed images to ``out/<breed|species>/``; return the official lists (as paths in ``out``) and drops."""
    lists = {split: _read_pet_list(_find_file(raw, f"{split}.txt")) for split in ("trainval", "test")}
    image_dir = _find_file(raw, "images") if not (raw / "images").is_dir() else raw / "images"
    by_stem: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.is_file() and images.is_image_name(p.name):
            by_stem.setdefault(p.stem, p)
    dropped: list[dict] = []
    official: dict[str, list[str]] = {"trainval": [], "test": []}
    for split, rows in lists.items():
        for stem, species in rows:
            src = by_stem.pop(stem, None)
            if src is None:
                dropped.append(
                    {"path": f"images/{stem}.jpg", "action": "dropped", "reason": f"listed in {split}.txt, missing"}
                )
                continue
            cls = _pet_class(stem, species, labels)
            (out / cls).mkdir(parents=True, exist_ok=True)
            os.rename(src, out / cls / src.name)
            official[split].append(f"{cls}/{src.name}")
    for p in sorted(image_dir.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            dropped.append(
                {"path": f"images/{p.name}", "action": "dropped", "reason": "not in the official trainval/test lists"}
            )
    return official, dropped


def official_split(out: Path, official: dict[str, list[str]], moves: dict[str, str | None], seed: int) -> dict:
    """trainval -> train + a seeded, stratified val of OXFORD_VAL_FRACTION; test stays test.

    ``moves`` maps paths the cleaning renamed to their new path, or to None when it dropped them.
    """
    kept = {
        split: [moves.get(rel, rel) for rel in rels if moves.get(rel, rel) is not None]
        for split, rels in official.items()
    }
    trainval = sorted(kept["trainval"])
    classes = sorted({rel.split("/", 1)[0] for rel in trainval})
    index = {c: i for i, c in enumerate(classes)}
    ds = datasets.Dataset(out, classes, trainval, [index[r.split("/", 1)[0]] for r in trainval], [])
    assigned, _ = datasets.assign_splits(ds, (1 - OXFORD_VAL_FRACTION, OXFORD_VAL_FRACTION, 0.0), seed)
    return {
        "train": [r for r in trainval if assigned[r] == "train"],
        "val": [r for r in trainval if assigned[r] == "val"],
        "test": sorted(kept["test"]),
    }
