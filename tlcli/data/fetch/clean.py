"""Cleaning: decode every file fully, drop what is not a whole image, fix extensions that lie about the format."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from tlcli.data import images
from tlcli.data.fetch.sizes import Progress, say

VERIFY_SIZE = 512
"""JPEGs are checked by decoding every scan at a reduced scale (not below this), so a 200 MP phone photo
is kept rather than refused as a decompression bomb; other formats are decoded in full."""

_FORMAT_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg"),
    "MPO": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "GIF": (".gif",),
    "BMP": (".bmp",),
    "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"),
}


def _inspect(path: Path) -> tuple[str | None, str | None]:
    """(PIL format, None) for a fully decodable image, (None, reason) otherwise."""
    try:
        images.decode(path, VERIFY_SIZE)
        with Image.open(path) as im:
            return im.format or "", None
    except images.ImageError as exc:
        return None, str(exc)
    except Exception as exc:  # PIL plugins raise a zoo of types on hostile bytes
        return None, f"{type(exc).__name__}: {exc}"


def _drop_kind(path: Path, reason: str) -> str:
    if reason == "hidden file":
        return reason
    if not path.stat().st_size:
        return "empty"
    if "cannot identify" in reason:
        return "not an image"
    if "truncated" in reason.lower():
        return "truncated"
    return "corrupt"


def _free_name(path: Path, suffix: str) -> Path:
    target = path.with_suffix(suffix)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.stem}-{n}{suffix}")
        n += 1
    return target


def _drop(path: Path, rel: str, error: str | None) -> dict:
    """Delete a file that is not a whole image; its record says why."""
    detail = (error or "").replace(str(path), rel)
    record = {"path": rel, "action": "dropped", "reason": _drop_kind(path, detail), "detail": detail}
    path.unlink()
    return record


def _fix_format(root: Path, path: Path, rel: str, fmt: str) -> dict | None:
    """Rename an image whose extension lies about its format, or convert an unusual format to PNG."""
    suffix = path.suffix.lower()
    accepted = _FORMAT_EXTENSIONS.get(fmt)
    if accepted and suffix in accepted:
        return None
    if accepted:
        target = _free_name(path, accepted[0])
        os.rename(path, target)
        action, reason = "renamed", f"{fmt} data under a {suffix or 'missing'} extension"
    else:
        target = _free_name(path, ".png")
        images.decode(path).save(target, format="PNG")
        path.unlink()
        action, reason = "converted", f"{fmt or 'unknown'} image converted to PNG"
    return {"path": rel, "action": action, "to": target.relative_to(root).as_posix(), "reason": reason}


def clean(root: str | os.PathLike, progress: Progress | None = None, workers: int | None = None) -> list[dict]:
    """Decode every file under ``root`` fully; delete what is not a whole image, fix wrong extensions.

    Returns one record per changed file: ``{"path", "action": "dropped"|"renamed"|"converted", "reason", ...}``
    with paths relative to ``root``.
    """
    root = Path(root)
    paths = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    workers = workers or min(8, os.cpu_count() or 1)
    records: list[dict] = []
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("ignore")
        for i, (path, (fmt, error)) in enumerate(zip(paths, pool.map(_inspect, paths), strict=True), 1):
            rel = path.relative_to(root).as_posix()
            say(progress, i, len(paths), "checking images")
            if any(part.startswith(".") for part in rel.split("/")):
                fmt, error = None, "hidden file"
            record = _drop(path, rel, error) if fmt is None else _fix_format(root, path, rel, fmt)
            if record is not None:
                records.append(record)
    return records
