"""fetch-data: download image datasets safely and resumably, unpack them, clean them and split them.

Known datasets live in ``REGISTRY``. Setting ``TLCLI_DATASET_MIRROR=URL`` fetches their files from
``URL/<file name>`` instead of the upstream host (same bytes, same checksums): for mirrors,
air-gapped caches and tests.

A dataset is built in a hidden staging folder beside its destination and renamed into place only
when complete, so ``data/<name>`` is either absent or whole; ``data/<name>/dataset.json`` marks it done.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import http.client
import lzma
import os
import posixpath
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from PIL import Image

from tlcli import __version__
from tlcli.data import datasets, images
from tlcli.errors import TlcliError, UsageError
from tlcli.store import files
from tlcli.store.files import read_json, write_json
from tlcli.store.locks import lock

Progress = Callable[..., None]
"""``progress(done, total, stage)``: bytes while downloading, files while unpacking and checking."""

MIRROR_ENV = "TLCLI_DATASET_MIRROR"
DOWNLOADS = ".downloads"
MAX_UNPACKED_BYTES = 20 * 10**9
MAX_FILES = 200_000
RETRIES = 5
RETRY_BACKOFF = 0.5
MAX_BACKOFF = 30.0
TIMEOUT = 60.0
CHUNK = 256 * 1024
SPACE_MARGIN = 64 * 2**20
VERIFY_SIZE = 512
"""JPEGs are checked by decoding every scan at a reduced scale (not below this), so a 200 MP phone photo
is kept rather than refused as a decompression bomb; other formats are decoded in full."""
LABELS = ("breeds", "species")
OXFORD_VAL_FRACTION = 0.1
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")


@dataclass(frozen=True)
class Remote:
    """One downloadable file of a known dataset and what its bytes must be."""

    url: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return posixpath.basename(urllib.parse.urlsplit(self.url).path)


@dataclass(frozen=True)
class Known:
    """A dataset tlcli knows how to fetch and lay out."""

    name: str
    description: str
    layout: str
    files: tuple[Remote, ...]
    classes: str
    licence: str
    homepage: str

    @property
    def size(self) -> int:
        return sum(r.size for r in self.files)


REGISTRY: dict[str, Known] = {
    "cats-vs-dogs": Known(
        name="cats-vs-dogs",
        description="Microsoft's Kaggle Cats and Dogs (Asirra / Petfinder photos), about 25,000 photos before cleaning",
        layout="petimages",
        files=(
            Remote(
                "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
                "kagglecatsanddogs_5340.zip",
                824887076,
                "b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9",
            ),
        ),
        classes="cat, dog",
        licence="Microsoft download terms (see the source page); photos from Petfinder.com",
        homepage="https://www.microsoft.com/en-us/download/details.aspx?id=54765",
    ),
    "oxford-pets": Known(
        name="oxford-pets",
        description="Oxford-IIIT Pet: 7,349 photos of 37 cat and dog breeds with the official trainval/test split",
        layout="oxford",
        files=(
            Remote(
                "https://thor.robots.ox.ac.uk/~vgg/data/pets/images.tar.gz",
                791918971,
                "67195c5e1c01f1ab5f9b6a5d22b8c27a580d896ece458917e61d459337fa318d",
            ),
            Remote(
                "https://thor.robots.ox.ac.uk/~vgg/data/pets/annotations.tar.gz",
                19173078,
                "52425fb6de5c424942b7626b428656fcbd798db970a937df61750c0f1d358e91",
            ),
        ),
        classes="37 breeds (cat, dog with --labels species)",
        licence="CC BY-SA 4.0; image copyright stays with the original owners",
        homepage="https://www.robots.ox.ac.uk/~vgg/data/pets/",
    ),
}


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as download pages use)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def remote_url(remote: Remote) -> str:
    """The URL to fetch ``remote`` from: upstream, or ``$TLCLI_DATASET_MIRROR/<file name>``."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{remote.filename}" if mirror else remote.url


def known_datasets() -> list[dict]:
    """The registry as plain dicts, for ``--list``."""
    return [
        {
            "name": k.name,
            "description": k.description,
            "classes": k.classes,
            "bytes": k.size,
            "licence": k.licence,
            "homepage": k.homepage,
            "files": [{"url": remote_url(r), "bytes": r.size, "sha256": r.sha256} for r in k.files],
        }
        for k in REGISTRY.values()
    ]


def _say(progress: Progress | None, done: int, total: int | None, stage: str) -> None:
    if progress is not None:
        progress(done, total, stage)


def _need_space(folder: Path, nbytes: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if nbytes > 0 and nbytes + SPACE_MARGIN > free:
        raise UsageError(
            f"not enough free space in {folder}: {what} needs {human_bytes(nbytes)} but only "
            f"{human_bytes(free)} is free; free some space or pass --data-dir on a bigger disk"
        )


# --- locks -------------------------------------------------------------------------------------


# --- download ----------------------------------------------------------------------------------


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _transient_reason(exc: BaseException) -> str | None:
    """A short reason when ``exc`` is worth retrying, else None."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}" if exc.code in TRANSIENT_HTTP else None
    if isinstance(exc, urllib.error.URLError):
        if isinstance(exc.reason, socket.gaierror):
            return None
        return str(exc.reason)
    if isinstance(exc, (http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)):
        return str(exc) or type(exc).__name__
    return None


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    sha256: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    retries: int = RETRIES,
    timeout: float = TIMEOUT,
) -> dict:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming with HTTP Range and retrying transient errors.

    The file is renamed to ``dest`` only after its size and sha256 (when given) check out; a mismatch
    deletes it and raises UsageError. An existing, matching ``dest`` is reused unless ``force``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    stage = f"downloading {dest.name}"
    if force:
        dest.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    if dest.exists():
        digest = files.sha256(dest)
        if (size is None or dest.stat().st_size == size) and (sha256 is None or digest == sha256.lower()):
            return {"path": dest, "bytes": 0, "resumed": False, "cached": True, "sha256": digest}
        dest.unlink()
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    resumed = have > 0
    total = size
    if total is not None:
        _need_space(dest.parent, total - have, stage)
    transferred = 0
    failures = 0
    best = have
    while total is None or have < total:
        headers = {"User-Agent": f"tlcli/{__version__}", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        gained = 0
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                if resp.status == 206:
                    start, full = _content_range(resp.headers.get("Content-Range"))
                    if start != have:
                        part.unlink(missing_ok=True)
                        have, resumed = 0, False
                        raise ConnectionError("server answered another byte range")
                    resumed = True
                elif resp.status == 200:
                    have, resumed = 0, False
                    full = int(length) if length and length.isdigit() else None
                else:
                    raise UsageError(f"download of {url} failed: unexpected HTTP {resp.status}; check the URL")
                if full is not None:
                    if total is not None and full != total:
                        raise UsageError(
                            f"{url} offers {full} bytes but {total} were expected; the file changed upstream "
                            "or the URL is wrong, nothing was unpacked"
                        )
                    if total is None:
                        _need_space(dest.parent, full - have, stage)
                    total = full
                with open(part, "ab" if have else "wb") as f:
                    while block := resp.read(CHUNK):
                        f.write(block)
                        have += len(block)
                        gained += len(block)
                        _say(progress, have, total, stage)
                    f.flush()
                    os.fsync(f.fileno())
                if total is None:
                    total = have
                elif have < total:
                    raise ConnectionError(f"connection closed after {have} of {total} bytes")
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                _, full = _content_range(exc.headers.get("Content-Range"))
                if full == have and (total is None or total == have):
                    total = have
                    break
                part.unlink(missing_ok=True)
                have, resumed = 0, False
            reason = _transient_reason(exc) or ("HTTP 416" if exc.code == 416 else None)
            if reason is None:
                raise UsageError(f"download of {url} failed: HTTP {exc.code} {exc.reason}; check the URL") from None
        except (OSError, http.client.HTTPException) as exc:
            reason = _transient_reason(exc)
            if reason is None:
                if isinstance(exc, urllib.error.URLError):
                    raise UsageError(f"cannot reach {url}: {exc.reason}; check the URL and the network") from None
                raise
        else:
            continue
        finally:
            transferred += gained
        failures = 1 if have > best else failures + 1
        best = max(best, have)
        if failures > retries:
            raise TlcliError(
                f"download of {url} failed after {retries + 1} attempts ({reason}); "
                f"re-run to resume from the {have} bytes already saved"
            )
        time.sleep(min(MAX_BACKOFF, RETRY_BACKOFF * 2 ** (failures - 1)))
    actual = part.stat().st_size
    digest = files.sha256(part)
    wrong = None
    if total is not None and actual != total:
        wrong = f"is {actual} bytes, not {total}"
    elif sha256 and digest != sha256.lower():
        wrong = f"has sha256 {digest}, not {sha256.lower()}"
    if wrong:
        part.unlink(missing_ok=True)
        raise UsageError(
            f"download of {dest.name} {wrong}; deleted it and unpacked nothing (re-run to download again, "
            "or check --sha256)"
        )
    os.replace(part, dest)
    return {"path": dest, "bytes": transferred, "resumed": resumed, "cached": False, "sha256": digest}


# --- safe extraction ---------------------------------------------------------------------------


class _Refused(UsageError):
    pass


@dataclass
class _Budget:
    archive: str
    max_bytes: int
    max_files: int
    bytes: int = 0
    files: int = 0

    def file(self, name: str) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise _Refused(
                f"refusing to unpack {self.archive}: more than {self.max_files} files (at {name!r}); "
                "not a dataset this tool unpacks"
            )

    def add(self, name: str, n: int) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise _Refused(
                f"refusing to unpack {self.archive}: it expands past {human_bytes(self.max_bytes)} "
                f"(at {name!r}); possible zip bomb"
            )


def _member_path(name: str, archive: str) -> PurePosixPath | None:
    """The safe relative path of an archive entry, None for the root itself; absolute or '..' paths are refused."""
    clean = name.replace("\\", "/")
    if "\x00" in clean:
        raise _Refused(f"refusing to unpack {archive}: entry {name!r} has a NUL byte in its name")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise _Refused(f"refusing to unpack {archive}: entry {name!r} has an absolute path")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused(f"refusing to unpack {archive}: entry {name!r} climbs out with '..'")
    return PurePosixPath(*parts) if parts else None


def _link_escapes(rel: PurePosixPath, target: str, hard: bool) -> bool:
    target = target.replace("\\", "/")
    if target.startswith("/") or re.match(r"^[A-Za-z]:", target):
        return True
    depth = [] if hard else list(rel.parent.parts)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not depth:
                return True
            depth.pop()
        else:
            depth.append(part)
    return False


def _check_link(rel: PurePosixPath, name: str, target: str, hard: bool, archive: str) -> None:
    """Links are never created; one that points outside the archive makes the whole archive refused."""
    if _link_escapes(rel, target, hard):
        raise _Refused(f"refusing to unpack {archive}: entry {name!r} is a link pointing outside ({target!r})")


def _write_member(src, target: Path, budget: _Budget, name: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as f:
        while block := src.read(CHUNK):
            budget.add(name, len(block))
            f.write(block)


def _unzip(archive: Path, dest: Path, budget: _Budget, progress: Progress | None) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        stage = f"unpacking {archive.name}"
        for i, info in enumerate(infos, 1):
            rel = _member_path(info.filename, archive.name)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if rel is None:
                continue
            if kind == stat.S_IFLNK:
                with zf.open(info) as src:
                    target = src.read(4096).decode("utf-8", "replace")
                _check_link(rel, info.filename, target, False, archive.name)
                continue
            if info.is_dir() or kind == stat.S_IFDIR:
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if kind not in (0, stat.S_IFREG):
                raise _Refused(
                    f"refusing to unpack {archive.name}: entry {info.filename!r} is a device, fifo or socket"
                )
            budget.file(info.filename)
            if info.file_size > budget.max_bytes - budget.bytes:
                budget.add(info.filename, info.file_size)
            with zf.open(info) as src:
                _write_member(src, dest / rel, budget, info.filename)
            _say(progress, i, len(infos), stage)


def _untar(archive: Path, dest: Path, budget: _Budget, progress: Progress | None) -> None:
    stage = f"unpacking {archive.name}"
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            rel = _member_path(member.name, archive.name)
            if member.issym() or member.islnk():
                _check_link(rel or PurePosixPath("."), member.name, member.linkname, member.islnk(), archive.name)
                continue
            if rel is None:
                continue
            if member.isdir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise _Refused(f"refusing to unpack {archive.name}: entry {member.name!r} is a device or fifo")
            budget.file(member.name)
            if member.size > budget.max_bytes - budget.bytes:
                budget.add(member.name, member.size)
            src = tf.extractfile(member)
            if src is not None:
                with src:
                    _write_member(src, dest / rel, budget, member.name)
            _say(progress, budget.files, None, stage)


def extract_archive(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_files: int = MAX_FILES,
    progress: Progress | None = None,
) -> dict:
    """Unpack a zip or tar(.gz/.bz2/.xz) into ``dest`` without ever writing outside it.

    Absolute paths, '..', links pointing outside, devices and fifos, more than ``max_files`` files or
    ``max_bytes`` unpacked bytes make it raise UsageError; links inside are skipped, never created.
    Callers unpack into a scratch folder and delete it on failure.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(archive.name, max_bytes, max_files)
    try:
        if zipfile.is_zipfile(archive):
            _unzip(archive, dest, budget, progress)
        elif tarfile.is_tarfile(archive):
            _untar(archive, dest, budget, progress)
        else:
            raise UsageError(f"{archive.name} is neither a zip nor a tar archive; give a .zip or .tar(.gz/.bz2/.xz)")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise UsageError(f"{archive.name} is damaged ({exc}); fetch it again with --force") from None
    except MemoryError:
        # members are copied in CHUNK blocks, so only a reader trusting a header's declared size gets here
        raise UsageError(
            f"{archive.name} is damaged (a header declares an impossible size); fetch it again with --force"
        ) from None
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
        raise UsageError(f"{archive.name} has conflicting entries ({exc.filename}); cannot unpack it") from None
    except NotImplementedError as exc:
        raise UsageError(f"{archive.name} uses something Python cannot unpack ({exc})") from None
    except RuntimeError as exc:
        raise UsageError(f"{archive.name} cannot be unpacked ({exc})") from None
    except OSError as exc:
        if exc.errno is None:
            raise UsageError(f"{archive.name} is damaged ({exc}); fetch it again with --force") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise UsageError(f"{archive.name} has an entry whose path is too long for this file system") from None
        if exc.errno == errno.EINVAL:
            raise UsageError(
                f"{archive.name} cannot be unpacked ({exc.strerror}): it is damaged or holds a name this file "
                "system refuses"
            ) from None
        raise
    return {"files": budget.files, "bytes": budget.bytes}


# --- cleaning ----------------------------------------------------------------------------------

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


def clean(root: str | os.PathLike, progress: Progress | None = None, workers: int | None = None) -> list[dict]:
    """Decode every file under ``root`` fully; delete what is not a whole image, fix wrong extensions.

    Returns one record per changed file: ``{"path", "action": "dropped"|"renamed"|"converted", "reason", ...}``
    with paths relative to ``root``.
    """
    root = Path(root)
    paths = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    workers = workers or min(8, os.cpu_count() or 1)
    records: list[dict] = []
    stage = "checking images"
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("ignore")
        for i, (path, (fmt, error)) in enumerate(zip(paths, pool.map(_inspect, paths), strict=True), 1):
            rel = path.relative_to(root).as_posix()
            _say(progress, i, len(paths), stage)
            if any(part.startswith(".") for part in rel.split("/")):
                fmt, error = None, "hidden file"
            if fmt is None:
                detail = (error or "").replace(str(path), rel)
                records.append({"path": rel, "action": "dropped", "reason": _drop_kind(path, detail), "detail": detail})
                path.unlink()
                continue
            suffix = path.suffix.lower()
            accepted = _FORMAT_EXTENSIONS.get(fmt)
            if accepted and suffix in accepted:
                continue
            if accepted:
                target = _free_name(path, accepted[0])
                os.rename(path, target)
                records.append(
                    {
                        "path": rel,
                        "action": "renamed",
                        "to": target.relative_to(root).as_posix(),
                        "reason": f"{fmt} data under a {suffix or 'missing'} extension",
                    }
                )
                continue
            target = _free_name(path, ".png")
            images.decode(path).save(target, format="PNG")
            path.unlink()
            records.append(
                {
                    "path": rel,
                    "action": "converted",
                    "to": target.relative_to(root).as_posix(),
                    "reason": f"{fmt or 'unknown'} image converted to PNG",
                }
            )
    return records


def _moves(records: list[dict]) -> dict[str, str | None]:
    """old path -> new path (None when dropped) from cleaning records."""
    return {r["path"]: r.get("to") for r in records}


# --- layouts -----------------------------------------------------------------------------------


def _visible(entries: Iterator[os.DirEntry]) -> list[os.DirEntry]:
    return [e for e in entries if not e.name.startswith(".") and e.name != "__MACOSX"]


def class_root(folder: str | os.PathLike) -> Path:
    """The folder whose sub-folders are the classes: ``folder`` itself, or below single wrapper folders."""
    folder = Path(folder)
    while True:
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


def _layout_class_folders(raw: Path, out: Path, lowercase: bool) -> None:
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


def _layout_oxford(raw: Path, out: Path, labels: str) -> tuple[dict[str, list[str]], list[dict]]:
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
            breed = re.sub(r"_\d+$", "", stem)
            if labels == "species":
                cat = species == 1 if species in (1, 2) else breed[:1].isupper()
                cls = "cat" if cat else "dog"
            else:
                cls = breed
            (out / cls).mkdir(parents=True, exist_ok=True)
            os.rename(src, out / cls / src.name)
            official[split].append(f"{cls}/{src.name}")
    for p in sorted(image_dir.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            dropped.append(
                {"path": f"images/{p.name}", "action": "dropped", "reason": "not in the official trainval/test lists"}
            )
    return official, dropped


def _official_split(out: Path, official: dict[str, list[str]], moves: dict[str, str | None], seed: int) -> dict:
    """trainval -> train + a seeded, stratified val of OXFORD_VAL_FRACTION; test stays test."""
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


# --- the whole fetch ---------------------------------------------------------------------------


@dataclass
class _Plan:
    kind: str
    name: str
    source: str
    known: Known | None = None
    url: str | None = None
    path: Path | None = None
    labels: str | None = None
    request: dict = field(default_factory=dict)


def _strip_archive_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _default_name(base: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", _strip_archive_suffix(base)).strip("-.")
    if not name or not NAME_PATTERN.match(name):
        raise UsageError(f"cannot make a dataset name from {base!r}; pass --name NAME")
    return name


def _plan(source: str, name: str | None, labels: str | None, fractions, seed: int, sha256: str | None) -> _Plan:
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UsageError(f"--sha256 {sha256!r} is not a sha256 (64 hex digits)")
    if labels is not None and labels not in LABELS:
        raise UsageError(f"--labels {labels!r} must be one of {', '.join(LABELS)}")
    if source in REGISTRY:
        known = REGISTRY[source]
        if sha256:
            raise UsageError(f"{source} carries its own checksums; --sha256 is for URLs and local archives")
        if labels and known.layout != "oxford":
            raise UsageError(f"--labels applies to oxford-pets only, not {source}")
        if known.layout == "oxford":
            labels = labels or "breeds"
            default = source if labels == "breeds" else f"{source}-{labels}"
            request = {"source": source, "labels": labels, "split": "official", "seed": seed}
        else:
            default = source
            request = {"source": source, "split": list(fractions), "seed": seed}
        plan = _Plan("known", name or default, source, known=known, labels=labels, request=request)
    else:
        if labels:
            raise UsageError("--labels applies to oxford-pets only")
        request = {"split": list(fractions), "seed": seed}
        if re.match(r"^https?://", source, re.I):
            base = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(source).path))
            plan = _Plan("url", name or _default_name(base or "dataset"), source, url=source)
        elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source):
            raise UsageError(f"{source}: only http:// and https:// URLs can be fetched")
        else:
            path = Path(source).expanduser()
            if not path.exists():
                close = difflib.get_close_matches(source, list(REGISTRY), n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise UsageError(
                    f"{source} is neither a known dataset nor an existing file or folder; {hint}"
                    "see 'tlcli fetch-data --list'"
                )
            path = path.resolve()
            kind = "folder" if path.is_dir() else "archive"
            plan = _Plan(kind, name or _default_name(path.name), str(path), path=path)
        plan.request = {"source": plan.source, **request}
    if not NAME_PATTERN.match(plan.name):
        raise UsageError(f"--name {plan.name!r} must be letters, digits, '.', '_' or '-' (not starting with . - _)")
    return plan


def _is_complete(dest: Path, request: dict) -> dict | None:
    """The dataset.json of a finished fetch made with the same request, else None."""
    meta_path = dest / "dataset.json"
    if not meta_path.is_file() or not (dest / "split.json").is_file():
        return None
    try:
        meta = read_json(meta_path)
    except UsageError:
        return None
    return meta if meta.get("request") == request else None


def _remove_leftovers(data_dir: Path, name: str) -> None:
    """Delete staging folders of killed runs (called under the dataset's lock)."""
    for pattern in (f".{name}.staging-*", f".{name}.old-*"):
        for p in data_dir.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def _publish(built: Path, dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
        os.rename(built, dest)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.rename(built, dest)


def _scan_built(out: Path, source: str) -> datasets.Dataset:
    """Scan the cleaned dataset; a one-line error in terms of the user's source when it is not a dataset."""
    try:
        return datasets.scan(out)
    except UsageError:
        dirs = sorted(d for d in out.iterdir() if d.is_dir()) if out.is_dir() else []
        found = [d.name for d in dirs if any(f.is_file() for f in d.rglob("*"))]
        listed = f" ({', '.join(found[:5])})" if found else ""
        raise UsageError(
            f"{source} holds {len(found)} class folder(s) with images{listed}; a dataset needs at least two "
            "sub-folders of images, one per class"
        ) from None


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


def _copy_folder(src: Path, out: Path) -> None:
    """Copy (never move) the class folders of a user's folder into ``out``."""
    root = class_root(src)
    out.mkdir(parents=True, exist_ok=True)
    for d in _class_dirs(root):
        shutil.copytree(d, out / d.name, ignore=shutil.ignore_patterns(".*"), ignore_dangling_symlinks=True)


def _summary_from_meta(meta: dict, dest: Path, seconds: float, up_to_date: bool, fetched: dict) -> dict:
    return {
        "name": meta["name"],
        "path": str(dest),
        "source": meta["source"],
        "kind": meta["kind"],
        "classes": meta["classes"],
        "counts": meta["counts"],
        "images": meta["images"],
        "splits": meta["splits"],
        "split_source": meta["split_source"],
        "dropped": meta["cleaning"]["dropped"],
        "renamed": meta["cleaning"]["renamed"],
        "drop_reasons": meta["cleaning"]["reasons"],
        "cleaning": str(dest / "cleaning.json"),
        "sha256": meta["sha256"],
        "downloaded_bytes": fetched.get("bytes", 0),
        "resumed": fetched.get("resumed", False),
        "cached": fetched.get("cached", up_to_date),
        "up_to_date": up_to_date,
        "seconds": round(seconds, 3),
    }


def fetch(
    source: str,
    *,
    name: str | None = None,
    data_dir: str | os.PathLike = "data",
    labels: str | None = None,
    fractions: tuple[float, float, float] = datasets.DEFAULT_FRACTIONS,
    seed: int = 0,
    sha256: str | None = None,
    force: bool = False,
    wait: bool = False,
    progress: Progress | None = None,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_files: int = MAX_FILES,
) -> dict:
    """Fetch a known dataset, an archive URL, a local archive or a folder into ``data_dir/<name>``.

    Writes ``<class>/<file>``, ``split.json``, ``dataset.json`` and ``cleaning.json``; a complete
    dataset from the same request is a no-op unless ``force``. Returns a summary.
    """
    started = time.monotonic()
    plan = _plan(source, name, labels, fractions, seed, sha256)
    data_dir = Path(data_dir)
    dest = data_dir / plan.name
    if plan.path is not None and plan.kind == "folder":
        target = dest.resolve()
        if target == plan.path or plan.path in target.parents or target in plan.path.parents:
            raise UsageError(f"{plan.path} overlaps the destination {dest}; pass another --name or --data-dir")
    if not force and (meta := _is_complete(dest, plan.request)):
        return _summary_from_meta(meta, dest, time.monotonic() - started, True, {})
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {data_dir}: {exc.strerror}; choose another --data-dir") from None
    with lock(data_dir / f"{plan.name}.lock", f"fetch-data is already fetching {plan.name}", wait=wait):
        if not force and (meta := _is_complete(dest, plan.request)):
            return _summary_from_meta(meta, dest, time.monotonic() - started, True, {})
        if (dest.exists() or dest.is_symlink()) and not force:
            what = "another source or other options" if (dest / "dataset.json").is_file() else "something else"
            raise UsageError(
                f"{dest} already exists and holds {what}; pass --force to replace it or choose another --name"
            )
        _remove_leftovers(data_dir, plan.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{plan.name}.staging-", dir=data_dir))
        try:
            meta, fetched = _build(
                plan, data_dir, staging, fractions, seed, sha256, force, wait, progress, max_bytes, max_files
            )
            _publish(staging / plan.name, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _summary_from_meta(meta, dest, time.monotonic() - started, False, fetched)


def _get_archives(
    plan: _Plan, data_dir: Path, sha256: str | None, force: bool, wait: bool, progress: Progress | None
) -> tuple[list[Path], dict, dict]:
    """Local paths of the plan's archives (downloaded or cached), their sha256s, and download totals."""
    downloads = data_dir / DOWNLOADS
    fetched = {"bytes": 0, "resumed": False, "cached": plan.kind != "archive"}
    digests: dict[str, str] = {}
    paths: list[Path] = []
    if plan.kind == "archive":
        digest = files.sha256(plan.path)
        if sha256 and digest != sha256.lower():
            raise UsageError(f"{plan.path} has sha256 {digest}, not {sha256.lower()}; nothing was unpacked")
        return [plan.path], {plan.path.name: digest}, fetched
    if plan.kind == "known":
        jobs = [(remote_url(r), downloads / r.filename, r.size, r.sha256) for r in plan.known.files]
        downloads.mkdir(parents=True, exist_ok=True)
        missing = 0
        for _, dest, size, _ in jobs:
            if force or not dest.exists():
                part = dest.with_name(dest.name + ".part")
                missing += size - (part.stat().st_size if part.exists() and not force else 0)
        _need_space(data_dir, missing + plan.known.size, f"fetching {plan.name}")
    else:
        base = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(plan.url).path)) or "archive"
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", base)
        tag = hashlib.sha256(plan.url.encode()).hexdigest()[:10]
        jobs = [(plan.url, downloads / f"{tag}-{safe}", None, sha256)]
    for url, dest, size, digest in jobs:
        with lock(dest.with_name(dest.name + ".lock"), f"fetch-data is already downloading {dest.name}", wait=wait):
            got = download(url, dest, size=size, sha256=digest, force=force, progress=progress)
        fetched["bytes"] += got["bytes"]
        fetched["resumed"] |= got["resumed"]
        fetched["cached"] &= got["cached"]
        digests[dest.name] = got["sha256"]
        paths.append(dest)
    return paths, digests, fetched


def _build(
    plan: _Plan,
    data_dir: Path,
    staging: Path,
    fractions,
    seed: int,
    sha256: str | None,
    force: bool,
    wait: bool,
    progress: Progress | None,
    max_bytes: int,
    max_files: int,
) -> tuple[dict, dict]:
    """Download, unpack, lay out, clean and split into ``staging/<name>``; return (dataset.json, download totals)."""
    out = staging / plan.name
    official = None
    drops: list[dict] = []
    if plan.kind == "folder":
        _need_space(data_dir, _folder_bytes(plan.path), f"copying {plan.path}")
        _copy_folder(plan.path, out)
        digests, fetched = {}, {"bytes": 0, "resumed": False, "cached": False}
    else:
        archives, digests, fetched = _get_archives(plan, data_dir, sha256, force, wait, progress)
        raw = staging / "raw"
        for archive in archives:
            _need_space(data_dir, archive.stat().st_size, f"unpacking {archive.name}")
            try:
                extract_archive(archive, raw, max_bytes=max_bytes, max_files=max_files, progress=progress)
            except UsageError:
                if plan.kind != "archive":
                    archive.unlink(missing_ok=True)
                raise
        if plan.known is not None and plan.known.layout == "oxford":
            official, drops = _layout_oxford(raw, out, plan.labels or "breeds")
        else:
            _layout_class_folders(raw, out, lowercase=plan.known is not None)
        shutil.rmtree(raw, ignore_errors=True)
    records = clean(out, progress=progress) if out.is_dir() else []
    ds = _scan_built(out, plan.source)
    for empty in ds.empty_classes:
        shutil.rmtree(out / empty, ignore_errors=True)
    if official is not None:
        split = _official_split(out, official, _moves(records), seed)
        split_source = "official"
    else:
        assigned, _ = datasets.assign_splits(ds, fractions, seed)
        split = {s: [rel for rel in ds.files if assigned[rel] == s] for s in datasets.SPLITS}
        split_source = "stratified"
    all_records = drops + records
    reasons = Counter(r["reason"] for r in all_records if r["action"] == "dropped")
    counts = Counter(ds.classes[label] for label in ds.labels)
    cleaning = {
        "checked": len(ds.files) + sum(1 for r in records if r["action"] == "dropped"),
        "kept": len(ds.files),
        "dropped": sum(reasons.values()),
        "renamed": sum(1 for r in all_records if r["action"] in ("renamed", "converted")),
        "reasons": dict(reasons),
    }
    write_json(out / "split.json", split)
    write_json(
        out / "cleaning.json",
        {**cleaning, "records": all_records},
    )
    meta = {
        "name": plan.name,
        "source": plan.source,
        "kind": plan.kind,
        "request": plan.request,
        "urls": [remote_url(r) for r in plan.known.files] if plan.known else ([plan.url] if plan.url else []),
        "homepage": plan.known.homepage if plan.known else None,
        "licence": plan.known.licence if plan.known else None,
        "sha256": digests,
        "classes": ds.classes,
        "counts": {c: counts[c] for c in ds.classes},
        "images": len(ds.files),
        "splits": {s: len(split[s]) for s in datasets.SPLITS},
        "split_source": split_source,
        "split_fractions": None if official is not None else list(fractions),
        "seed": seed,
        "cleaning": cleaning,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tlcli": __version__,
    }
    write_json(out / "dataset.json", meta)
    return meta, fetched
