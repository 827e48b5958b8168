"""Fuzz the image loader and the archive extractor with hypothesis over random, mutated and hostile bytes.

Every example must end in a result or the documented error (``images.ImageError`` for a bad image,
``UsageError`` for a bad archive) within a wall-clock bound and a resident-memory budget, and must
leave every file outside its destination untouched. Examples are derandomized, so CI replays the
same inputs on every run; ``@example`` inputs are the ones that once broke the code.
"""

from __future__ import annotations

import bz2
import contextlib
import faulthandler
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import posixpath
import resource
import signal
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, reject, settings
from hypothesis import strategies as st
from PIL import Image, features

from tlcli.data import datasets, images
from tlcli.data.fetch.dataset import fetch
from tlcli.data.fetch.request import FetchRequest
from tlcli.data.fetch.unpack import extract_archive
from tlcli.errors import UsageError
from tlcli.models.graph import apply_model

HANG_SECONDS = 20
MEMORY_BUDGET = 1 << 30
ADDRESS_SPACE_NET = 6 << 30
SIZES = (1, 32, 224)
POLICIES = ("crop", "squash", "pad", "crop+pad")
MAX_BYTES = 64_000
MAX_FILES = 40
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def fuzz(examples: int, deadline: float = 10) -> settings:
    """Reproducible hypothesis settings: fixed inputs, no example database, a deadline far above a normal example."""
    return settings(
        max_examples=examples,
        deadline=timedelta(seconds=deadline),
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --- bounds ------------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm; a BaseException so the loader's catch-all cannot turn a hang into an ImageError."""


def _status(field: str) -> int:
    """A size from /proc/self/status (VmSize, VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current resident size so the next peak is this example's own (Linux 4.0+)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@contextlib.contextmanager
def bounded(seconds: float = HANG_SECONDS, memory: int | None = MEMORY_BUDGET) -> Iterator[None]:
    """Run one example under a SIGALRM time bound; with ``memory``, fail if resident memory peaks past it.

    Address space is capped at ADDRESS_SPACE_NET over today's, so a runaway allocation fails with
    MemoryError instead of swapping the shared machine (the cap is higher than the budget because
    Pillow reserves, without touching, a buffer as large as a chunk's declared length). A hang stuck
    in C code, where the alarm cannot interrupt, is ended by faulthandler (stacks dumped, process
    exited) rather than stalling CI.
    """

    def on_alarm(signum, frame):
        raise Hang(f"example still running after {seconds} s")

    limits = resource.getrlimit(resource.RLIMIT_AS)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    if memory is not None:
        _reset_peak()
        start = _status("VmRSS")
        cap = _status("VmSize") + ADDRESS_SPACE_NET
        resource.setrlimit(resource.RLIMIT_AS, (min(cap, limits[1]) if limits[1] >= 0 else cap, limits[1]))
    faulthandler.dump_traceback_later(seconds * 3, exit=True)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Hang as exc:
        raise AssertionError(str(exc)) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        resource.setrlimit(resource.RLIMIT_AS, limits)
        signal.signal(signal.SIGALRM, previous)
    if memory is not None:
        grew = _status("VmHWM") - start
        assert grew <= memory, f"resident memory peaked {grew >> 20} MB above its start (budget {memory >> 20} MB)"


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Kind, size, mtime and content hash of every entry under ``root``, leaving out the ``skip`` subtree."""
    seen: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            path = here / name
            st_ = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st_.st_mode) else None
            seen[str(path.relative_to(root))] = (stat.S_IFMT(st_.st_mode), st_.st_size, st_.st_mtime_ns, digest)
    return seen


# --- image inputs ------------------------------------------------------------------------------


def _encode(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


@functools.cache
def seed_images() -> dict[str, bytes]:
    """Small valid files of every kind the loader converts, 20x12 pixels (12x20 once EXIF-rotated)."""
    y, x = np.mgrid[0:12, 0:20]
    rgb = np.stack([x * 12, y * 20, (x + y) * 8], axis=-1).astype(np.uint8)
    alpha = (x * 13).astype(np.uint8)
    base = Image.fromarray(rgb)
    rotated = base.getexif()
    rotated[0x0112] = 6
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [palette, palette.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    seeds = {
        "rgb.jpg": _encode(base, "JPEG", quality=85),
        "progressive.jpg": _encode(base, "JPEG", progressive=True),
        "grey.jpg": _encode(base.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(base.convert("CMYK"), "JPEG"),
        "exif-rotated.jpg": _encode(base, "JPEG", exif=rotated.tobytes()),
        "rgb.png": _encode(base, "PNG"),
        "grey16.png": _encode(Image.fromarray((y * 5000 + x * 700).astype(np.uint16)), "PNG"),
        "rgba.png": _encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"),
        "la.png": _encode(Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"), "PNG"),
        "palette-transparent.png": _encode(palette, "PNG", transparency=0),
        "palette.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=0),
        "rgb.bmp": _encode(base, "BMP"),
        "lzw.tif": _encode(base, "TIFF", compression="tiff_lzw"),
    }
    if features.check("webp"):
        seeds["lossy.webp"] = _encode(base, "WEBP", quality=80)
        seeds["rgba-lossless.webp"] = _encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "WEBP", lossless=True)
    return seeds


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk CRC so a mutation reaches the decoder instead of stopping at the checksum."""
    if not data.startswith(PNG_MAGIC):
        return data
    out, pos = bytearray(data), len(PNG_MAGIC)
    while pos + 12 <= len(out):
        end = pos + 8 + int.from_bytes(out[pos : pos + 4], "big")
        if end + 4 > len(out):
            break
        out[end : end + 4] = zlib.crc32(out[pos + 4 : end]).to_bytes(4, "big")
        pos = end + 4
    return bytes(out)


INTERESTING = (
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xff\xff",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x7f\xff\xff\xff",
)


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "interesting", "insert", "delete", "duplicate", "truncate"]),
        st.integers(0, 1 << 16),
        st.integers(0, 255),
        st.binary(min_size=1, max_size=32),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytes:
    """``data`` after bit flips, byte sets, inserts, deletes, duplications or a truncation.

    Positions wrap around the length, so one drawn list of operations applies to any bytes: the
    archive tests mutate archives whose bytes depend on the temporary folder's path.
    """
    out = bytearray(data)
    for op, position, number, chunk in ops:
        at = position % (len(out) or 1)
        if op == "flip" and out:
            out[at] ^= 1 << (number % 8)
        elif op == "set" and out:
            out[at] = number
        elif op == "interesting":
            value = INTERESTING[number % len(INTERESTING)]
            out[at : at + len(value)] = value
        elif op == "insert":
            out[at:at] = chunk
        elif op == "delete":
            del out[at : at + 1 + number % 64]
        elif op == "duplicate":
            out[at:at] = out[at : at + 1 + number % 64] * (1 + number % 8)
        elif op == "truncate":
            del out[at:]
    return bytes(out)


@st.composite
def mutated_image(draw) -> tuple[str, bytes]:
    """(file name, bytes) of a seed image after mutations; PNG CRCs are fixed up half of the time."""
    name = draw(st.sampled_from(sorted(seed_images())))
    data = mutate(seed_images()[name], draw(MUTATIONS))
    return name, fix_png_crcs(data) if draw(st.booleans()) else data


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


PNG_DEPTHS = [(0, 1), (0, 8), (0, 16), (2, 8), (2, 16), (3, 8), (4, 8), (4, 16), (6, 8), (6, 16)]
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
RAW_CAP = 4 << 20


def png_header_file(width: int, height: int, depth: tuple[int, int], rows: str) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height``, with no, some or all (up to RAW_CAP) rows of zero pixels."""
    colour, bits = depth
    row = 1 + (width * PNG_CHANNELS[colour] * bits + 7) // 8
    raw = {"none": 0, "some": min(row * 3, RAW_CAP), "all": min(row * height, RAW_CAP)}[rows]
    body = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0))
    if colour == 3:
        body += _png_chunk(b"PLTE", bytes(range(256)) * 3)
    return PNG_MAGIC + body + _png_chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + _png_chunk(b"IEND", b"")


def gif_header_file(width: int, height: int) -> bytes:
    """A GIF whose screen and first frame claim ``width`` x ``height``, with a few codes of LZW data."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def bmp_header_file(width: int, height: int, rows: str) -> bytes:
    """A 24-bit BMP claiming ``width`` x ``height`` (negative height: top-down) with some or all rows."""
    row = ((width * 24 + 31) // 32) * 4
    pixels = bytes({"none": 0, "some": min(row * 2, RAW_CAP), "all": min(row * abs(height), RAW_CAP)}[rows])
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54) + info + pixels


def jpeg_header_file(width: int, height: int) -> bytes:
    """The seed JPEG with its SOF0 marker patched to claim ``width`` x ``height``."""
    data = bytearray(seed_images()["rgb.jpg"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_header_file(width: int, height: int, rows: str) -> bytes:
    """An uncompressed 8-bit grey TIFF claiming ``width`` x ``height`` in one strip, with some or all rows."""
    pixels = bytes({"none": 0, "some": min(width * 2, RAW_CAP), "all": min(width * height, RAW_CAP)}[rows])
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
    tags += [(273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(pixels))]
    ifd_size = 2 + 12 * len(tags) + 4
    tags[5] = (273, 4, 8 + ifd_size)
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags) + bytes(4)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + pixels


def webp_header_file(width: int, height: int) -> bytes:
    """A WebP with a VP8X canvas of ``width`` x ``height`` around the seed's small VP8 frame."""
    frame = seed_images().get("lossy.webp", b"RIFF\x00\x00\x00\x00WEBP")[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + (height - 1).to_bytes(3, "little") + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


FORMAT_LIMITS = {"png": 2**31 - 1, "bmp": 2**31 - 1, "tiff": 2**32 - 1, "gif": 65535, "jpeg": 65535, "webp": 2**24}
NOTABLE_DIMENSIONS = [
    (60000, 60000),
    (65535, 65535),
    (16384, 16384),
    (11000, 11000),
    (8000, 8001),
    (8000, 8000),
    (1, 2_000_000),
    (2_000_000, 1),
    (1, 65535),
    (65535, 1),
    (3, 250_000),
]


@st.composite
def huge_image(draw) -> tuple[str, bytes]:
    """(file name, bytes) of a header declaring huge or extreme dimensions: decompression and aspect-ratio bombs."""
    fmt = draw(st.sampled_from(sorted(FORMAT_LIMITS)))
    dims = st.tuples(st.integers(1, FORMAT_LIMITS[fmt]), st.integers(1, FORMAT_LIMITS[fmt]))
    width, height = draw(st.sampled_from(NOTABLE_DIMENSIONS) | dims)
    width, height = min(width, FORMAT_LIMITS[fmt]), min(height, FORMAT_LIMITS[fmt])
    rows = draw(st.sampled_from(["none", "some", "all"]))
    if fmt == "png":
        return "bomb.png", png_header_file(width, height, draw(st.sampled_from(PNG_DEPTHS)), rows)
    if fmt == "bmp":
        return "bomb.bmp", bmp_header_file(width, height * draw(st.sampled_from([1, -1])), rows)
    if fmt == "tiff":
        return "bomb.tif", tiff_header_file(width, height, rows)
    if fmt == "gif":
        return "bomb.gif", gif_header_file(width, height)
    if fmt == "jpeg":
        return "bomb.jpg", jpeg_header_file(width, height)
    return "bomb.webp", webp_header_file(width, height)


IMAGE_MAGIC = [
    b"",
    b"\xff\xd8\xff\xe0",
    PNG_MAGIC,
    PNG_MAGIC + b"\x00\x00\x00\x0dIHDR",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    b"8BPS",
    b"\x00\x00\x01\x00",
]


# --- image checks ------------------------------------------------------------------------------


def load_outcome(path: str | Path, size: int, policy: str) -> np.ndarray | images.ImageError:
    """``images.load``'s pixels or its ImageError, under the time and memory bounds; other exceptions propagate."""
    with bounded():
        try:
            return images.load(path, size, policy)
        except images.ImageError as exc:
            return exc


def check_image(name: str, data: bytes, size: int, policy: str) -> np.ndarray | images.ImageError:
    """Load ``data`` from a file called ``name``: pixels of the promised shape or an ImageError, nothing written."""
    with tempfile.TemporaryDirectory(prefix="tlcli-fuzz-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        before = snapshot(Path(tmp))
        outcome = load_outcome(path, size, policy)
        assert snapshot(Path(tmp)) == before, "the loader wrote beside the image"
    if isinstance(outcome, images.ImageError):
        assert str(outcome), "ImageError without a reason"
        assert not isinstance(outcome.__cause__, MemoryError), f"ran into the address-space net: {outcome}"
    else:
        assert isinstance(outcome, np.ndarray) and outcome.dtype == np.uint8
        assert outcome.shape == images.pixel_shape(size, policy)
    return outcome


def test_seed_images_decode_upright_to_rgb():
    """The mutation seeds are valid: each decodes to 20x12 RGB (12x20 for the EXIF-rotated one)."""
    for name, data in seed_images().items():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(data)
            im = images.decode(Path(tmp) / name)
            assert im.mode == "RGB" and im.size == ((12, 20) if name == "exif-rotated.jpg" else (20, 12)), name
            pixels = check_image(name, data, 32, "crop+pad")
            assert isinstance(pixels, np.ndarray) and pixels.std() > 5, name


@fuzz(200)
@given(
    magic=st.sampled_from(IMAGE_MAGIC),
    body=st.binary(max_size=4096),
    ext=st.sampled_from(images.IMAGE_EXTENSIONS),
    size=st.sampled_from(SIZES),
    policy=st.sampled_from(POLICIES),
)
def test_random_bytes_never_crash_the_loader(magic: bytes, body: bytes, ext: str, size: int, policy: str):
    """Random bytes behind a real or no format signature: an ImageError (or, rarely, an image), never a crash."""
    outcome = check_image(f"random{ext}", magic + body, size, policy)
    event(type(outcome).__name__)
    if not magic and not body:
        assert str(outcome) == "empty file"


@fuzz(400)
@given(image=mutated_image(), size=st.sampled_from(SIZES), policy=st.sampled_from(POLICIES))
def test_mutated_images_load_or_raise_image_error(image: tuple[str, bytes], size: int, policy: str):
    """Flipped, inserted, deleted and truncated bytes in every supported format and mode."""
    event(type(check_image(*image, size, policy)).__name__)


@fuzz(120)
@given(image=huge_image(), size=st.sampled_from(SIZES), policy=st.sampled_from(POLICIES))
@example(image=("strip.png", png_header_file(1, 2_000_000, (0, 1), "some")), size=224, policy="crop")
@example(image=("grey16.png", png_header_file(11300, 11300, (0, 16), "some")), size=32, policy="pad")
@example(image=("rgba.png", png_header_file(8000, 8000, (6, 8), "some")), size=32, policy="crop+pad")
def test_huge_declared_dimensions_stay_within_the_memory_budget(image: tuple[str, bytes], size: int, policy: str):
    """Headers claiming enormous or extreme-aspect images: refused or decoded within the memory budget.

    The examples once broke it: a 68-byte 1x2,000,000 PNG that ``crop`` scaled whole to 224x448,000,000
    pixels (MemoryError; a 276-byte 200,000x1 one got the process OOM-killed), a 128-megapixel 16-bit PNG
    that PIL only warns about and whose float64 conversion took gigabytes, and an RGBA image at the pixel
    limit composited in whole-image copies (1.5 GB).
    """
    event(type(check_image(*image, size, policy)).__name__)


# --- batch pipeline ----------------------------------------------------------------------------


@functools.cache
def pooling_model():
    """A tiny pixels-in model: the per-channel mean of a 32x32 image."""
    import keras

    return keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D()])


@st.composite
def image_folder(draw) -> list[tuple[str, bytes]]:
    """1-3 valid seeds and 1-4 mutated ones, shuffled."""
    good = draw(st.lists(st.sampled_from(sorted(seed_images())), min_size=1, max_size=3))
    bad = draw(st.lists(mutated_image(), min_size=1, max_size=4))
    files = [(f"good-{i}-{n}", seed_images()[n]) for i, n in enumerate(good)]
    files += [(f"mutant-{i}-{n}", data) for i, (n, data) in enumerate(bad)]
    return draw(st.permutations(files))


@fuzz(6, deadline=60)
@given(files=image_folder(), policy=st.sampled_from(images.RESIZE_POLICIES))
def test_batch_pipeline_keeps_good_files_and_lists_bad_ones(files: list[tuple[str, bytes]], policy: str):
    """Through the batch pipeline and a model: decodable files give its output, the rest are skipped with the reason."""
    model = pooling_model()
    with tempfile.TemporaryDirectory(prefix="tlcli-fuzz-") as tmp:
        paths = []
        for name, data in files:
            paths.append(str(Path(tmp) / name))
            Path(paths[-1]).write_bytes(data)
        with bounded(seconds=120, memory=None):
            outputs, kept, skipped = apply_model(model, paths, 32, policy, batch_size=4)
        direct = [load_outcome(p, 32, policy) for p in paths]
    good = [i for i, o in enumerate(direct) if isinstance(o, np.ndarray)]
    event(f"{len(paths) - len(good)} of {len(paths)} skipped")
    assert kept == good
    assert all(i in good for i, (name, _) in enumerate(files) if name.startswith("good-"))
    assert skipped == [{"path": paths[i], "reason": str(direct[i])} for i in range(len(paths)) if i not in good]
    expected = np.asarray([direct[i].mean(axis=(0, 1)) for i in good], np.float32).reshape(-1, 3)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-3)


# --- archives ----------------------------------------------------------------------------------

ESCAPE = "{outside}"
LINK_KINDS = ("symlink", "hardlink")
SPECIAL_KINDS = ("fifo", "chardev", "blockdev", "oddtype")


@dataclass(frozen=True)
class Member:
    """One archive entry to build: kind, raw name, file bytes, link target, declared size."""

    kind: str
    name: str
    data: bytes = b""
    target: str = ""
    size: int = 0


SAFE_PARTS = ["a", "b", "red", "x.jpg", " ", "...", "a..b", "~", "été", "猫.png", "e\u0301", "\u202e", "CON", "*?<>|"]
SAFE_PARTS += ["x" * 255]
HOSTILE_PARTS = ["..", ".", "", "y" * 256, "é" * 128, "a\\..\\..", "..\\", "C:", "\t\n", "\x00"]
COLLIDING_NAMES = ["a", "a/b", "a\\b", "./a/b", "b/", "a/b/c", "a//b"]
NAME_PREFIXES = ["", "/", "./", "//", "../", "../../", "C:/", "C:\\", "\\\\srv\\share\\", ESCAPE + "/"]


@st.composite
def member_names(draw) -> str:
    """Entry names: mostly plain, some from a tiny pool so they repeat or nest, a quarter hostile ('..', absolute
    paths, './', empty or too long parts) and a few too deep for the file system."""
    roll = draw(st.integers(0, 15))
    if roll == 0:
        return "d/" * 2100 + "deep.jpg"
    if roll < 4:
        return draw(st.sampled_from(COLLIDING_NAMES))
    if roll < 12:
        parts = draw(st.lists(st.sampled_from(SAFE_PARTS), min_size=1, max_size=3))
        return draw(st.sampled_from(["", "./"])) + draw(st.sampled_from(["/", "\\"])).join(parts)
    prefix = draw(st.sampled_from(NAME_PREFIXES))
    parts = draw(st.lists(st.sampled_from(SAFE_PARTS + HOSTILE_PARTS) | st.text(max_size=6), min_size=1, max_size=5))
    return prefix + draw(st.sampled_from(["/", "\\"])).join(parts) + draw(st.sampled_from(["", "/", "\\"]))


LINK_TARGETS = st.sampled_from(["x.jpg", "../x.jpg", "../../outside/victim.txt", "/etc/passwd", "a/../..", ""]) | (
    st.lists(st.sampled_from(["..", ".", "a", "b"]), max_size=5).map("/".join)
)


@st.composite
def members(draw, names: st.SearchStrategy[str]) -> Member:
    """One entry: mostly small files, also folders, links inside and outside, devices, fifos and size lies."""
    kind = draw(st.sampled_from(["file"] * 8 + ["dir", "dir", "symlink", "hardlink", "contiguous", "huge", "special"]))
    if kind == "special":
        return Member(draw(st.sampled_from(SPECIAL_KINDS)), draw(names))
    name = draw(names)
    if kind in ("file", "contiguous"):
        data = draw(st.binary(max_size=200) | st.sampled_from([bytes(MAX_BYTES + 1), b"\x00" * 10]))
        return Member(kind, name, data=data)
    if kind in LINK_KINDS:
        return Member(kind, name, target=draw(LINK_TARGETS | st.just(ESCAPE + "/victim.txt")))
    if kind == "huge":
        return Member(kind, name, size=draw(st.sampled_from([MAX_BYTES + 1, 2**31, 2**32 - 2, 2**40])))
    return Member(kind, name)


ARCHIVE_FORMATS = ["zip", "zip-deflate", "zip-bzip2", "zip-lzma", "tar", "tar.gz", "tar.bz2", "tar.xz"]
ZIP_METHODS = {
    "zip": zipfile.ZIP_STORED,
    "zip-deflate": zipfile.ZIP_DEFLATED,
    "zip-bzip2": zipfile.ZIP_BZIP2,
    "zip-lzma": zipfile.ZIP_LZMA,
}
ZIP_MODES = {
    "file": stat.S_IFREG | 0o644,
    "contiguous": stat.S_IFREG | 0o644,
    "huge": stat.S_IFREG | 0o644,
    "dir": stat.S_IFDIR | 0o755,
    "symlink": stat.S_IFLNK | 0o777,
    "hardlink": stat.S_IFLNK | 0o777,
    "fifo": stat.S_IFIFO | 0o644,
    "chardev": stat.S_IFCHR | 0o644,
    "blockdev": stat.S_IFBLK | 0o644,
    "oddtype": stat.S_IFSOCK | 0o644,
}
TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "contiguous": tarfile.CONTTYPE,
    "huge": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
    "oddtype": b"Z",
}


def _lie_about_zip_sizes(data: bytes, sizes: dict[int, int]) -> bytes:
    """Rewrite the uncompressed size in the central directory entry of each member index in ``sizes``."""
    out = bytearray(data)
    pos = zipfile.ZipFile(io.BytesIO(data)).start_dir
    for index in range(max(sizes, default=-1) + 1):
        name_len, extra_len, comment_len = struct.unpack("<HHH", out[pos + 28 : pos + 34])
        if index in sizes:
            out[pos + 24 : pos + 28] = struct.pack("<I", sizes[index])
        pos += 46 + name_len + extra_len + comment_len
    return bytes(out)


def build_archive(fmt: str, entries: list[Member], tar_format: int) -> bytes:
    """The bytes of a ``fmt`` archive holding ``entries`` in order, the same on every run (no timestamps).

    Raises ValueError or UnicodeError when the format cannot hold an entry (a long name in ustar, say).
    """
    buf = io.BytesIO()
    if fmt.startswith("zip"):
        with zipfile.ZipFile(buf, "w", ZIP_METHODS[fmt]) as zf:
            for m in entries:
                info = zipfile.ZipInfo(m.name + "/" if m.kind == "dir" and not m.name.endswith("/") else m.name)
                info.compress_type = ZIP_METHODS[fmt]
                info.external_attr = ZIP_MODES[m.kind] << 16
                zf.writestr(info, m.data if m.kind in ("file", "contiguous") else m.target.encode())
        lies = {i: min(m.size, 2**32 - 2) for i, m in enumerate(entries) if m.kind == "huge"}
        return _lie_about_zip_sizes(buf.getvalue(), lies) if lies else buf.getvalue()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tf:
        for m in entries:
            info = tarfile.TarInfo(m.name)
            info.type, info.linkname = TAR_TYPES[m.kind], m.target
            if m.kind in ("file", "contiguous"):
                info.size = len(m.data)
                tf.addfile(info, io.BytesIO(m.data))
            else:
                info.size = m.size
                tf.addfile(info)
    wrappers = {"tar": bytes, "tar.gz": lambda raw: gzip.compress(raw, mtime=0), "tar.bz2": bz2.compress}
    return wrappers.get(fmt, lzma.compress)(buf.getvalue())


REFUSED = "refused"
UNSURE = "unsure"


def _has_drive(name: str) -> bool:
    return len(name) > 1 and name[1] == ":" and name[0].isascii() and name[0].isalpha()


def _clean_path(name: str) -> tuple[str, ...] | None | str:
    """The parts of an entry name once '\\' and './' are read as zip and tar tools do; REFUSED for absolute or '..'."""
    name = name.replace("\\", "/")
    if name.startswith("/") or _has_drive(name):
        return REFUSED
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        return REFUSED
    return parts or None


def _link_escapes(parts: tuple[str, ...], target: str, hard: bool) -> bool:
    target = target.replace("\\", "/")
    if target.startswith("/") or _has_drive(target):
        return True
    base = "" if hard else posixpath.join(*parts[:-1]) if len(parts) > 1 else ""
    resolved = posixpath.normpath(posixpath.join(base, target) if base else target or ".")
    return resolved == ".." or resolved.startswith("../")


def expected_extraction(fmt: str, entries: list[Member], dest: Path) -> dict[str, bytes] | str:
    """What a correct safe extractor must do: REFUSED, UNSURE (edge cases only checked for safety), or the files.

    Refused: an absolute or '..' name, a link leading outside, a tar hard link to anything but a file
    unpacked before it (which becomes a copy), a device, fifo or unknown type, a declared or real size
    past the cap, a name the file system cannot hold, or a file where a folder must go.
    """
    is_zip = fmt.startswith("zip")
    files: dict[str, bytes] = {}
    folders: set[str] = set()
    refused = False
    total = 0
    for m in entries:
        if "\x00" in m.name or "\x00" in m.target:
            return UNSURE
        parts = _clean_path(m.name)
        if parts == REFUSED:
            refused = True
            continue
        kind = "symlink" if is_zip and m.kind == "hardlink" else m.kind
        if is_zip and m.name.endswith("/") and kind not in LINK_KINDS:
            kind = "dir"
        if kind in LINK_KINDS:
            if parts is None:
                return UNSURE
            if _link_escapes(parts, m.target, kind == "hardlink"):
                refused = True
                continue
            if kind == "symlink":
                continue
            source = _clean_path(m.target)
            if not isinstance(source, tuple) or "/".join(source) not in files:
                refused = True
                continue
            kind, m = "file", Member("file", m.name, files["/".join(source)])
        if parts is None:
            continue
        if kind in SPECIAL_KINDS:
            refused = True
            continue
        full = os.fsencode(dest.joinpath(*parts))
        if len(full) >= 4000 or any(len(p.encode()) > 255 for p in parts):
            refused = True
            continue
        path = "/".join(parts)
        parents = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if kind == "dir":
            folders |= parents | {path}
        elif kind == "huge":
            refused = True
        else:
            total += len(m.data)
            files[path] = m.data
            folders |= parents
    if refused or total > MAX_BYTES or any(f in folders for f in files):
        return REFUSED
    return files


def _resolve(entries: list[Member], outside: Path) -> list[Member]:
    return [
        Member(m.kind, m.name.replace(ESCAPE, str(outside)), m.data, m.target.replace(ESCAPE, str(outside)), m.size)
        for m in entries
    ]


@contextlib.contextmanager
def sandbox() -> Iterator[tuple[Path, Path]]:
    """(root, destination): a victim file outside, an empty destination three levels down so '../..' stays in root."""
    with tempfile.TemporaryDirectory(prefix="tlcli-fuzz-") as tmp:
        root = Path(tmp)
        (root / "outside").mkdir()
        (root / "outside" / "victim.txt").write_bytes(b"victim")
        (root / "a" / "b" / "dest").mkdir(parents=True)
        yield root, root / "a" / "b" / "dest"


def check_extraction(root: Path, dest: Path, archive: Path) -> dict[str, bytes] | UsageError:
    """Extract under the bounds; assert only plain files and folders appeared, all inside ``dest``, within the caps."""
    before = snapshot(root, skip=dest)
    with bounded():
        try:
            outcome = extract_archive(archive, dest, max_bytes=MAX_BYTES, max_files=MAX_FILES)
        except UsageError as exc:
            outcome = exc
    assert snapshot(root, skip=dest) == before, "an entry was written outside the destination"
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            assert stat.S_ISDIR(mode) or stat.S_ISREG(mode), f"{path} is neither a file nor a folder"
            if stat.S_ISREG(mode):
                assert path.lstat().st_nlink == 1, f"{path} is a hard link"
                files[path.relative_to(dest).as_posix()] = path.read_bytes()
    assert sum(map(len, files.values())) <= MAX_BYTES and len(files) <= MAX_FILES
    if isinstance(outcome, UsageError):
        assert str(outcome) and "\n" not in str(outcome), "a UsageError must be one line"
        return outcome
    assert len(files) <= outcome["files"] and sum(map(len, files.values())) <= outcome["bytes"] <= MAX_BYTES
    return files


@fuzz(200)
@given(
    fmt=st.sampled_from(ARCHIVE_FORMATS),
    tar_format=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    entries=st.lists(members(member_names()), min_size=1, max_size=6),
)
@example(fmt="zip", tar_format=tarfile.PAX_FORMAT, entries=[Member("file", "a/x", b"1"), Member("file", "a\\x", b"2")])
@example(fmt="tar", tar_format=tarfile.GNU_FORMAT, entries=[Member("file", "a", b"1"), Member("file", "a/b", b"2")])
@example(fmt="zip", tar_format=tarfile.PAX_FORMAT, entries=[Member("file", "d/" * 2100 + "deep.jpg")])
@example(fmt="tar.gz", tar_format=tarfile.PAX_FORMAT, entries=[Member("file", "a/" + "y" * 256)])
def test_hostile_archives_extract_exactly_or_are_refused(fmt: str, tar_format: int, entries: list[Member]):
    """Generated zips and tars: a safe archive extracts to exactly its files, an unsafe one raises UsageError.

    The first examples pin a duplicate (the later one wins) and a file where a folder must go; the
    others, entries whose path or name is too long for the file system, once escaped as OSError
    (ENAMETOOLONG) instead of UsageError.
    """
    with sandbox() as (root, dest):
        entries = _resolve(entries, root / "outside")
        try:
            data = build_archive(fmt, entries, tar_format)
        except (ValueError, UnicodeError, struct.error):
            reject()
        archive = root / f"in.{fmt.split('-')[0]}"
        archive.write_bytes(data)
        expected = expected_extraction(fmt, entries, dest)
        outcome = check_extraction(root, dest, archive)
    event(f"expected {'files' if isinstance(expected, dict) else expected}, got {type(outcome).__name__}")
    if expected == REFUSED:
        assert isinstance(outcome, UsageError), f"unsafe archive was extracted: {sorted(outcome)}"
    elif expected != UNSURE:
        assert not isinstance(outcome, UsageError), f"safe archive refused: {outcome}"
        assert outcome == expected


ARCHIVE_MAGIC = [b"", b"PK\x03\x04", b"PK\x05\x06" + bytes(18), b"\x1f\x8b\x08", b"BZh9", b"\xfd7zXZ\x00", b"ustar"]


TAR_TYPE_FLAGS = [b"0", b"\x00", b"1", b"2", b"3", b"5", b"6", b"7", b"L", b"K", b"x", b"g"]
TAR_SIZE_FIELDS = [
    b"\x80" + bytes(10) + b"\x01",
    b"\x80" + bytes(3) + b"\x7f" + bytes(7),
    b"\xff" * 12,
    b"77777777777\x00",
]


def tar_block(fields: bytes, kind: bytes, size_field: bytes | None = None, magic: bytes = b"ustar\x0000") -> bytes:
    """A 512-byte tar header: ``fields`` with the magic, entry type ``kind``, a raw size field and a valid checksum."""
    block = bytearray(fields)
    block[257:265] = magic
    block[156:157] = kind
    if size_field is not None:
        block[124:136] = size_field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


@st.composite
def tar_header(draw) -> bytes:
    """A tar header of random fields that passes the checksum (sizes often base-256), then random data."""
    fields = draw(st.binary(min_size=512, max_size=512))
    kind = draw(st.sampled_from(TAR_TYPE_FLAGS))
    size_field = draw(st.none() | st.sampled_from(TAR_SIZE_FIELDS))
    magic = draw(st.sampled_from([b"ustar\x0000", b"ustar  \x00"]))
    return tar_block(fields, kind, size_field, magic) + draw(st.binary(max_size=1024))


@st.composite
def archive_bytes(draw) -> tuple[str, bytes]:
    """(file name, bytes): random bytes behind an archive signature, a random tar header, or a mutated valid archive."""
    how = draw(st.sampled_from(["random", "tar-header", "mutated", "mutated", "mutated"]))
    if how == "random":
        return "random.zip", draw(st.sampled_from(ARCHIVE_MAGIC)) + draw(st.binary(max_size=2048))
    if how == "tar-header":
        return "header.tar", draw(tar_header())
    fmt = draw(st.sampled_from(ARCHIVE_FORMATS))
    return f"mutated.{fmt.split('-')[0]}", mutate(small_archive(fmt), draw(MUTATIONS))


def small_archive(fmt: str) -> bytes:
    """A valid ``fmt`` archive of a folder, two photos and a text file: the seed for mutations."""
    good = [Member("dir", "pack/"), Member("file", "pack/red/r.jpg", seed_images()["rgb.jpg"])]
    good += [Member("file", "pack/blue/b.png", seed_images()["rgb.png"]), Member("file", "pack/notes.txt", b"hi" * 40)]
    return build_archive(fmt, good, tarfile.PAX_FORMAT)


@fuzz(250)
@given(archive=archive_bytes())
@example(archive=("cut.zip", build_archive("zip", [Member("file", "r.jpg", b"\xff\xd8")], tarfile.PAX_FORMAT)[1:]))
@example(archive=("header.tar", tar_block(bytes(512), b"L", TAR_SIZE_FIELDS[1]) + bytes(1024)))
def test_random_and_mutated_archive_bytes_extract_or_raise_usage_error(archive: tuple[str, bytes]):
    """Truncated zips, corrupted tar headers and damaged gz/bz2/xz streams: UsageError or a safe partial result.

    The examples once escaped as other exceptions, and fetch-data kept the damaged download cached: a zip
    missing its first byte made zipfile seek before the start of the file (OSError EINVAL), and a GNU
    long-name header declaring a base-256 size near 2**63 made tarfile allocate it (MemoryError).
    """
    name, data = archive
    with sandbox() as (root, dest):
        (root / name).write_bytes(data)
        event(type(check_extraction(root, dest, root / name)).__name__)


@st.composite
def dataset_entries(draw) -> list[Member]:
    """A two-class dataset, sometimes with mutated images and hostile or broken entries, in random order."""
    entries = [Member("file", "set/red/r.jpg", seed_images()["rgb.jpg"])]
    entries += [Member("file", "set/blue/b.png", seed_images()["rgba.png"])]
    entries += [Member("file", f"set/blue/{n}", d) for n, d in draw(st.lists(mutated_image(), max_size=2))]
    entries += draw(st.lists(members(member_names()), max_size=3))
    return draw(st.permutations(entries))


@fuzz(40)
@given(fmt=st.sampled_from(ARCHIVE_FORMATS), entries=dataset_entries(), damage=st.none() | MUTATIONS)
def test_fetch_publishes_a_whole_dataset_or_nothing(fmt: str, entries: list[Member], damage: list | None):
    """fetch-data on a local archive: ``data/<name>`` appears complete or not at all, no staging folder is left."""
    with sandbox() as (root, _):
        try:
            archive = build_archive(fmt, _resolve(entries, root / "outside"), tarfile.PAX_FORMAT)
        except (ValueError, UnicodeError, struct.error):
            reject()
        if damage:
            archive = mutate(archive, damage)
        source = root / "outside" / f"set.{fmt.split('-')[0]}"
        source.write_bytes(archive)
        store = root / "data"
        before = snapshot(root)
        with bounded():
            try:
                outcome = fetch(
                    FetchRequest(str(source), name="fz"), data_dir=store, max_bytes=MAX_BYTES, max_files=MAX_FILES
                )
            except UsageError as exc:
                outcome = exc
        assert snapshot(root, skip=store) == before, "fetch-data wrote outside its data folder"
        left = sorted(p.name for p in store.iterdir())
        event("refused" if isinstance(outcome, UsageError) else "published")
        if isinstance(outcome, UsageError):
            assert str(outcome) and "\n" not in str(outcome), "a UsageError must be one line"
            assert left in ([], ["fz.lock"]), f"a failed fetch left {left}"
            return
        assert left in (["fz"], ["fz", "fz.lock"]), f"a fetch left {left}"
        built = store / "fz"
        assert (built / "dataset.json").is_file() and outcome["images"] >= 2
        split = json.loads((built / "split.json").read_text())
        listed = sorted(split["train"] + split["val"] + split["test"])
        on_disk = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file() and p.parent != built)
        assert listed == on_disk and len(listed) == outcome["images"]
        if not damage:
            assert {"blue", "red"} <= set(outcome["classes"]), outcome["classes"]
        for rel in listed:
            images.decode(built / rel)


# --- folder scanning ---------------------------------------------------------------------------

FOLDER_NAMES = ["cat", "dog", "a", "sub", ".hidden", "x.jpg", "y.PNG", ".h.jpg", "é.jpg", "a b.jpeg", "猫.png"]
FOLDER_NAMES += [os.fsdecode(b"odd\xff.jpg"), os.fsdecode(b"\xfe\xfd"), "x" * 251 + ".jpg", "notes.txt"]
FOLDER_LINKS = [".", "..", "../..", "../../..", "../dog", "../cat/sub", "cat", "x.jpg", "nowhere.jpg", "{outside}"]


@st.composite
def folder_ops(draw) -> list[tuple]:
    """Steps that build a data folder: folders, files, links (loops, siblings, outside, dangling), hard links,
    fifos and permission changes, at paths one to three names deep (three levels down in the sandbox, so
    '../../..' stays inside it)."""
    paths = st.lists(st.sampled_from(FOLDER_NAMES), min_size=1, max_size=3).map("/".join)
    step = st.one_of(
        st.tuples(st.just("dir"), paths),
        st.tuples(st.just("file"), paths),
        st.tuples(st.just("file"), paths),
        st.tuples(st.just("symlink"), paths, st.sampled_from(FOLDER_LINKS)),
        st.tuples(st.just("hardlink"), paths, paths),
        st.tuples(st.just("fifo"), paths),
        st.tuples(st.just("chmod"), paths, st.sampled_from([0o000, 0o311, 0o644])),
    )
    base = [("file", "cat/x.jpg"), ("file", "dog/x.jpg")]
    return base + draw(st.lists(step, max_size=10))


def _build_folder(data: Path, outside: Path, ops: list[tuple]) -> None:
    for kind, rel, *arg in ops:
        path = data / rel
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "dir":
                path.mkdir(exist_ok=True)
            elif kind == "file":
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK)  # a fifo: ENXIO, no hang
                os.write(fd, rel.encode("utf-8", "surrogateescape"))
                os.close(fd)
            elif kind == "symlink":
                path.symlink_to(str(outside) if arg[0] == ESCAPE else arg[0])
            elif kind == "hardlink":
                os.link(data / arg[0], path)
            elif kind == "fifo":
                os.mkfifo(path)
            elif not path.is_symlink():
                os.chmod(path, arg[0])


def _reachable(data: Path) -> tuple[set[tuple[int, int]], bool]:
    """What a scan must list, found another way: the (device, inode) of every regular image-named file reached
    from the class folders through visible names (links followed), and whether the folders form a cycle."""
    files: set[tuple[int, int]] = set()
    state: dict[str, str] = {}
    cycle = False

    def visit(folder: str) -> None:
        nonlocal cycle
        real = os.path.realpath(folder)
        if state.get(real) == "open":
            cycle = True
        if real in state:
            return
        state[real] = "open"
        with contextlib.suppress(OSError):
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                with contextlib.suppress(OSError):
                    st_ = os.stat(entry.path)
                    if stat.S_ISDIR(st_.st_mode):
                        visit(entry.path)
                    elif stat.S_ISREG(st_.st_mode) and images.is_image_name(entry.name) and folder != str(data):
                        files.add((st_.st_dev, st_.st_ino))
        state[real] = "done"

    visit(str(data))
    return files, cycle


def _open_descriptors() -> set[str]:
    """This process's open file descriptors (empty where /proc is not mounted)."""
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


@fuzz(100)
@given(ops=folder_ops())
@example(ops=[("file", "cat/x.jpg"), ("file", "dog/x.jpg"), ("symlink", "cat/loop", ".")])
@example(ops=[("file", "cat/x.jpg"), ("file", "dog/x.jpg"), ("symlink", "cat/dogs", "../dog"), ("symlink", "a", "cat")])
@example(ops=[("file", "cat/x.jpg"), ("file", "dog/x.jpg"), ("file", os.fsdecode(b"cat/odd\xff.jpg"))])
def test_folder_scan_lists_each_real_file_once_or_refuses_a_loop(ops: list[tuple]):
    """Class folders with odd names, links (loops, into other classes, outside, dangling), hard links, fifos and
    unreadable entries: scan ends, lists every reachable image file exactly once under its class, or says in
    one line why not (a link that loops, a folder it cannot read, fewer than two classes)."""
    with sandbox() as (root, data):
        (root / "outside" / "far.jpg").write_bytes(b"far")
        try:
            _build_folder(data, root / "outside", ops)
            held = _open_descriptors()
            with bounded(memory=None):
                try:
                    outcome = datasets.scan(data)
                except UsageError as exc:
                    outcome = exc
            assert _open_descriptors() == held, "the scan left folders open"
            expected, cycle = _reachable(data)
            event(type(outcome).__name__ + (" with a cycle" if cycle else ""))
            if isinstance(outcome, UsageError):
                message = str(outcome)
                assert message and "\n" not in message, "a UsageError must be one line"
                assert ("links back" in message and cycle) or "cannot read" in message or "class" in message, message
                return
            keys = []
            for rel, label in zip(outcome.files, outcome.labels, strict=True):
                assert rel.split("/")[0] == outcome.classes[label] and images.is_image_name(rel)
                with contextlib.suppress(FileNotFoundError):
                    st_ = os.stat(data / rel)
                    keys.append((st_.st_dev, st_.st_ino))
            assert len(keys) == len(set(keys)), "a real file was listed twice"
            assert set(keys) == expected, "a reachable image file was left out, or an unreachable one listed"
        finally:
            for dirpath, dirnames, _ in os.walk(root):
                for name in dirnames:
                    with contextlib.suppress(OSError):
                        if not os.path.islink(os.path.join(dirpath, name)):
                            os.chmod(os.path.join(dirpath, name), 0o755)
