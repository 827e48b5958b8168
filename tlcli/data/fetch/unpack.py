"""Safe archive extraction: zip and tar(.gz/.bz2/.xz) within file and byte budgets, never writing outside.

Member paths are checked (no absolute paths, no '..', no NUL), links are never created and refused when
they point outside (a tar's hard link to a file unpacked before it becomes a copy), devices and fifos are
refused, zip bombs are refused by entry compression ratio and by a total scaled to the archive's size, and
every error becomes a one-line UsageError.
"""

from __future__ import annotations

import errno
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tlcli.data.fetch.sizes import CHUNK, Progress, human_bytes, say
from tlcli.errors import UsageError

MAX_UNPACKED_BYTES = 20 * 10**9
MAX_FILES = 200_000
MAX_RATIO = 100
"""An archive unpacks to at most MAX_RATIO times its own size (photos barely compress), or to
SMALL_ARCHIVE_ALLOWANCE when that is more, so a small archive of well-compressing images still unpacks."""
SMALL_ARCHIVE_ALLOWANCE = 512 * 10**6
MAX_ENTRY_RATIO = 250
"""A zip entry over ENTRY_RATIO_FROM bytes that compression shrank more than MAX_ENTRY_RATIO-fold is refused."""
ENTRY_RATIO_FROM = 10 * 10**6


class _Refused(UsageError):
    pass


@dataclass
class _Budget:
    archive: str
    max_bytes: int
    max_files: int
    bytes: int = 0
    files: int = 0

    def file(self, name: str, declared: int) -> None:
        """Count one more file, refusing it at once when its declared size alone overruns the byte budget."""
        self.files += 1
        if self.files > self.max_files:
            raise _Refused(
                f"refusing to unpack {self.archive}: more than {self.max_files} files (at {name!r}); "
                "not a dataset this tool unpacks"
            )
        if declared > self.max_bytes - self.bytes:
            self.add(name, declared)

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


def _unzip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, budget: _Budget) -> bool:
    """Unpack one zip entry; True when it was a file (counted against the budget)."""
    rel = _member_path(info.filename, budget.archive)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if rel is None:
        return False
    if kind == stat.S_IFLNK:
        with zf.open(info) as src:
            target = src.read(4096).decode("utf-8", "replace")
        _check_link(rel, info.filename, target, False, budget.archive)
        return False
    if info.is_dir() or kind == stat.S_IFDIR:
        (dest / rel).mkdir(parents=True, exist_ok=True)
        return False
    if kind not in (0, stat.S_IFREG):
        raise _Refused(f"refusing to unpack {budget.archive}: entry {info.filename!r} is a device, fifo or socket")
    budget.file(info.filename, info.file_size)
    with zf.open(info) as src:
        _write_member(src, dest / rel, budget, info.filename)
    return True


def _check_zip_sizes(infos: list[zipfile.ZipInfo], budget: _Budget) -> None:
    """Refuse a zip bomb from its central directory, before anything is written: an entry that expands
    implausibly, or declared sizes past the budget."""
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > ENTRY_RATIO_FROM and ratio > MAX_ENTRY_RATIO:
            raise _Refused(
                f"refusing to unpack {budget.archive}: entry {info.filename!r} expands {ratio:.0f}-fold "
                f"({human_bytes(info.compress_size)} to {human_bytes(info.file_size)}); possible zip bomb"
            )
    declared = sum(info.file_size for info in infos if not info.is_dir())
    if declared > budget.max_bytes:
        raise _Refused(
            f"refusing to unpack {budget.archive}: it declares {human_bytes(declared)} of files, over the "
            f"{human_bytes(budget.max_bytes)} allowed for it; possible zip bomb"
        )


def _unzip(archive: Path, dest: Path, budget: _Budget, progress: Progress | None) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _check_zip_sizes(infos, budget)
        for i, info in enumerate(infos, 1):
            if _unzip_member(zf, info, dest, budget):
                say(progress, i, len(infos), f"unpacking {archive.name}")


def _copy_hard_link(member: tarfile.TarInfo, rel: PurePosixPath, dest: Path, budget: _Budget) -> bool:
    """A hard link to a file unpacked before it becomes a copy of that file; to anything else, a refusal."""
    source = _member_path(member.linkname, budget.archive)
    if source is None or not (dest / source).is_file() or (dest / source).is_symlink():
        raise _Refused(
            f"refusing to unpack {budget.archive}: entry {member.name!r} is a hard link to {member.linkname!r}, "
            "which is not a file unpacked before it"
        )
    budget.file(member.name, (dest / source).stat().st_size)
    if dest / rel != dest / source:
        with open(dest / source, "rb") as src:
            _write_member(src, dest / rel, budget, member.name)
    return True


def _untar_member(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, budget: _Budget) -> bool:
    """Unpack one tar entry; True when it was a file (counted against the budget)."""
    rel = _member_path(member.name, budget.archive)
    if member.issym() or member.islnk():
        _check_link(rel or PurePosixPath("."), member.name, member.linkname, member.islnk(), budget.archive)
        if member.islnk() and rel is not None:
            return _copy_hard_link(member, rel, dest, budget)
        return False
    if rel is None:
        return False
    if member.isdir():
        (dest / rel).mkdir(parents=True, exist_ok=True)
        return False
    if not member.isfile():
        raise _Refused(f"refusing to unpack {budget.archive}: entry {member.name!r} is a device or fifo")
    budget.file(member.name, member.size)
    src = tf.extractfile(member)
    if src is not None:
        with src:
            _write_member(src, dest / rel, budget, member.name)
    return True


def _untar(archive: Path, dest: Path, budget: _Budget, progress: Progress | None) -> None:
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            if _untar_member(tf, member, dest, budget):
                say(progress, budget.files, None, f"unpacking {archive.name}")


def _as_usage_error(name: str, exc: Exception) -> UsageError | None:
    """The one-line error for what a damaged or unusual archive raised, None for a real system error."""
    if isinstance(exc, (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)):
        return UsageError(f"{name} is damaged ({exc}); fetch it again with --force")
    if isinstance(exc, MemoryError):
        # members are copied in CHUNK blocks, so only a reader trusting a header's declared size gets here
        return UsageError(f"{name} is damaged (a header declares an impossible size); fetch it again with --force")
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, FileExistsError)):
        return UsageError(f"{name} has conflicting entries ({exc.filename}); cannot unpack it")
    if isinstance(exc, NotImplementedError):
        return UsageError(f"{name} uses something Python cannot unpack ({exc})")
    if isinstance(exc, RuntimeError):
        return UsageError(f"{name} cannot be unpacked ({exc})")
    if isinstance(exc, OSError) and exc.errno is None:
        return UsageError(f"{name} is damaged ({exc}); fetch it again with --force")
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return UsageError(f"{name} has an entry whose path is too long for this file system")
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL:
        return UsageError(
            f"{name} cannot be unpacked ({exc.strerror}): it is damaged or holds a name this file system refuses"
        )
    return None


def unpacked_cap(archive: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> int:
    """The most ``archive`` may unpack to: MAX_RATIO times its size (at least SMALL_ARCHIVE_ALLOWANCE), at most
    ``max_bytes``."""
    return min(max_bytes, max(archive.stat().st_size * MAX_RATIO, SMALL_ARCHIVE_ALLOWANCE))


def unpacked_size(archive: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> int:
    """The bytes ``archive`` unpacks to, to check for free space first: a zip's directory says (a zip bomb is
    refused here, before anything is written); a tar's own size stands in."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except Exception:  # not a readable zip: extract_archive says what it is
        return archive.stat().st_size
    _check_zip_sizes(infos, _Budget(archive.name, unpacked_cap(archive, max_bytes), MAX_FILES))
    return sum(info.file_size for info in infos if not info.is_dir())


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
    more unpacked bytes than ``unpacked_cap`` make it raise UsageError; symbolic links inside are skipped,
    never created, and a hard link to a file unpacked before it becomes a copy.
    Callers unpack into a scratch folder and delete it on failure.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(archive.name, unpacked_cap(archive, max_bytes), max_files)
    try:
        if zipfile.is_zipfile(archive):
            _unzip(archive, dest, budget, progress)
        elif tarfile.is_tarfile(archive):
            _untar(archive, dest, budget, progress)
        else:
            raise UsageError(f"{archive.name} is neither a zip nor a tar archive; give a .zip or .tar(.gz/.bz2/.xz)")
    except Exception as exc:
        error = _as_usage_error(archive.name, exc)
        if error is None:
            raise
        raise error from None
    return {"files": budget.files, "bytes": budget.bytes}
