"""The one image-loading path: decode any photo to RGB pixels of a fixed size, and batch them ahead in threads."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from tlcli.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
RESIZE_POLICIES = ("squash", "crop", "pad")
DEFAULT_RESIZE = "crop+pad"
PAD_VALUE = 127
TILE_PIXELS = 1 << 20

ImageFile.LOAD_TRUNCATED_IMAGES = False
MAX_PIXELS = 64_000_000
"""Images that would decode to more pixels (after a JPEG's reduced-scale draft) are refused as decompression
bombs. PIL's own check at open sees only the header's size, so it is off: it would refuse a 200 MP phone
photo that decodes to 3 MP at the scale tlcli needs."""
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """A file that is not a decodable image."""


def has_image_suffix(name: str) -> bool:
    """True when ``name`` ends in an image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_image_name(path: str | Path) -> bool:
    """True when the file name carries an image extension (case-insensitive) and is not hidden."""
    name = os.path.basename(str(path))
    return not name.startswith(".") and has_image_suffix(name)


def _tiles(width: int, height: int) -> Iterator[tuple[int, int, int, int]]:
    """Boxes of at most TILE_PIXELS pixels covering a ``width`` x ``height`` image, row by row."""
    tile_w = max(1, min(width, TILE_PIXELS))
    tile_h = max(1, min(height, TILE_PIXELS // tile_w))
    for top in range(0, height, tile_h):
        for left in range(0, width, tile_w):
            yield left, top, min(left + tile_w, width), min(top + tile_h, height)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode (grey, 16-bit, palette, CMYK, alpha) to 8-bit RGB; alpha is composited on white.

    Deep and alpha images are converted tile by tile: whole-image temporaries of a 64-megapixel
    image would take gigabytes.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im).reshape(-1)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        grey = np.empty(arr.shape, np.uint8)
        for start in range(0, arr.size, TILE_PIXELS):
            part = arr[start : start + TILE_PIXELS].astype(np.float64)
            grey[start : start + TILE_PIXELS] = np.clip(part * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey.reshape(im.height, im.width), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgb = Image.new("RGB", im.size)
        for box in _tiles(*im.size):
            tile = im.crop(box).convert("RGBA")
            white = Image.new("RGBA", tile.size, (255, 255, 255, 255))
            rgb.paste(Image.alpha_composite(white, tile).convert("RGB"), box[:2])
        return rgb
    return im.convert("RGB") if im.mode != "RGB" else im


def decode(path: str | Path, size: int | None = None) -> Image.Image:
    """Fully decode an image file to an upright RGB PIL image; raise ImageError for anything else.

    Images over ``MAX_PIXELS`` at the scale they would decode to are refused before decoding.

    With ``size``, JPEGs are decoded at a reduced scale (never below ``size`` on either side).
    """
    try:
        with Image.open(path) as im:
            if size and im.format == "JPEG":
                im.draft("RGB", (size, size))
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(
                    f"{im.width}x{im.height} pixels is over the limit of {MAX_PIXELS} (possible decompression bomb)"
                )
            im.seek(0)
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            rgb = _to_rgb(im)
            rgb.load()
            if rgb.width < 1 or rgb.height < 1:
                raise ImageError("image has no pixels")
            return rgb
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0].replace(f" {os.fspath(path)!r}", "") if str(exc) else type(exc).__name__
        if os.path.exists(path) and os.path.getsize(path) == 0:
            reason = "empty file"
        raise ImageError(reason) from exc
    except Exception as exc:  # PIL plugins raise a zoo of types on hostile bytes
        raise ImageError(f"{type(exc).__name__}: {exc}") from exc


def views(policy: str) -> list[str]:
    """The resize policies of a (possibly multi-view) policy such as ``crop+pad``; usage error if unknown."""
    parts = policy.split("+")
    bad = [p for p in parts if p not in RESIZE_POLICIES]
    if bad or not policy or len(set(parts)) != len(parts):
        raise UsageError(
            f"unknown resize policy {policy!r}; use one of {', '.join(RESIZE_POLICIES)} or views joined by '+' "
            "(e.g. crop+pad)"
        )
    return parts


def pixel_shape(size: int, policy: str) -> tuple[int, ...]:
    """Shape of one image's pixels: (size, size, 3), or (views, size, size, 3) for a multi-view policy."""
    n = len(views(policy))
    return (size, size, 3) if n == 1 else (n, size, size, 3)


def fit(im: Image.Image, size: int, policy: str = "crop") -> Image.Image:
    """Resize to size x size with the geometry of Keras' ``Resizing`` layer, which a saved model's views use.

    ``squash`` ignores the aspect ratio; ``crop`` centre-crops the largest square (whole-pixel
    offsets, rounded down) and resamples only that box, never the parts it cuts off: a quarter less
    work on a 4:3 photo, and a 1x2,000,000 strip costs no more than its square; ``pad`` pads the photo
    with grey to a square (the same whole number of pixels on both sides) and resamples the lot (a
    photo over three times ``size`` is box-reduced first, as ``reducing_gap`` would).
    PIL's BILINEAR is the triangle filter of ``Resizing(antialias=True)``: the model's views of the
    same decoded photo differ from these only by rounding to 8 bits.
    """
    if policy == "squash":
        return im.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    w, h = im.size
    if policy == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return im.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side), reducing_gap=3.0)
    if policy == "pad":
        factor = max(w, h) // (3 * size)
        if factor > 1:  # the box reduction reducing_gap would make, on the photo alone: the grey square stays small
            im = im.reduce(factor)
            w, h = im.size
        side = max(w, h)
        left, top = (side - w) // 2, (side - h) // 2
        canvas = Image.new("RGB", (w + 2 * left, h + 2 * top), (PAD_VALUE,) * 3)
        canvas.paste(im, (left, top))
        return canvas.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    raise UsageError(f"unknown resize policy {policy!r}; use one of {', '.join(RESIZE_POLICIES)}")


def load(path: str | Path, size: int, policy: str = "crop") -> np.ndarray:
    """Load one image as uint8 RGB pixels of ``pixel_shape(size, policy)``."""
    parts = views(policy)
    im = decode(path, size)
    arrays = [np.asarray(fit(im, size, p), dtype=np.uint8) for p in parts]
    return arrays[0] if len(arrays) == 1 else np.stack(arrays)


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """Encode an image as PNG in memory (the caller writes it atomically with files.write_bytes)."""
    import io

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig) -> bytes:
    """Render a matplotlib figure as PNG bytes and close it (plots are written like images, atomically)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


Batch = tuple[np.ndarray, np.ndarray, list[str]]
Photos = tuple[list[np.ndarray], np.ndarray, list[str]]


def photo(path: str | Path, size: int) -> np.ndarray:
    """One image decoded as tlcli decodes it (upright 8-bit RGB, JPEGs at a reduced scale no smaller than
    ``size``) but not resized: what a saved model, which builds its views itself, is fed."""
    return np.asarray(decode(path, size), dtype=np.uint8)


def _load_or_blank(path: str, size: int, policy: str | None) -> tuple[np.ndarray, bool, str]:
    """``load`` (or ``photo`` when ``policy`` is None), or blank pixels with ok=False and the reason when the
    file is not a usable image."""
    try:
        return (photo(path, size) if policy is None else load(path, size, policy)), True, ""
    except ImageError as exc:
        return np.zeros((1, 1, 3) if policy is None else pixel_shape(size, policy), np.uint8), False, str(exc)


def _load_batch(paths: Sequence[str], size: int, policy: str | None) -> Batch | Photos:
    """Load one batch: pixels (blank where a file is not an image; a list of photos when ``policy`` is None),
    ok mask and error reasons."""
    pixels, ok, why = zip(*(_load_or_blank(path, size, policy) for path in paths), strict=True)
    return (list(pixels) if policy is None else np.stack(pixels)), np.asarray(ok, bool), list(why)


def load_workers() -> int:
    """Threads that decode images: one per usable core (PIL releases the GIL while decoding and resizing)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _ahead(paths: Sequence[str], size: int, policy: str | None, batch_size: int) -> Iterator:
    """``_load_batch`` over ``paths`` in order, a pool of one thread per core loading whole batches ahead.

    At most one batch per thread and one more wait, so memory does not grow with the number of files.
    """
    workers = load_workers()
    with ThreadPoolExecutor(workers, thread_name_prefix="tlcli-load") as pool:
        ahead: deque[Future] = deque()
        try:
            for start in range(0, len(paths), batch_size):
                ahead.append(pool.submit(_load_batch, paths[start : start + batch_size], size, policy))
                if len(ahead) > workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()


def batches(paths: Sequence[str], size: int, policy: str = "crop", batch_size: int = 32) -> Iterator[Batch]:
    """Yield (pixels uint8 [b, *pixel_shape], ok mask [b], error reasons [b]) over ``paths`` in order.

    Decoded ahead in threads while the caller runs the model on the previous batch. Undecodable files
    come back with ok=False and a reason instead of raising.
    """
    pixel_shape(size, policy)
    return _ahead(paths, size, policy, batch_size)


def photo_batches(paths: Sequence[str], size: int, batch_size: int = 32) -> Iterator[Photos]:
    """``batches`` of whole decoded photos (``photo``, each its own size) instead of views."""
    return _ahead(paths, size, None, batch_size)
