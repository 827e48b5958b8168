"""Class-folder datasets: scan the files, and split them into train/val/test deterministically."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tlcli.data.images import has_image_suffix
from tlcli.errors import UsageError
from tlcli.store.features import SPLITS

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


Stat = tuple[int, int] | None
"""A file's (size, mtime_ns) as the scan found it, or None when it could not be read."""


@dataclass
class Dataset:
    """Image files under ``root``, as paths relative to it, with their class names (and, from ``scan``, each
    file's ``Stat``, so a caller need not read it again)."""

    root: Path
    classes: list[str]
    files: list[str]
    labels: list[int]
    empty_classes: list[str]
    stats: list[Stat] | None = None


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _unreadable(folder: str, root: Path, exc: OSError) -> UsageError:
    return UsageError(f"cannot read {folder} ({exc.strerror}); fix its permissions or move it out of {root}")


def _entries(folder: str, root: Path, fd: int | None = None) -> list[str]:
    """The names of ``folder``'s (open as ``fd`` if given) visible entries in order; an unreadable folder is a usage
    error, not a gap."""
    try:
        with os.scandir(folder if fd is None else fd) as it:
            return sorted(e.name for e in it if not e.name.startswith("."))
    except OSError as exc:
        raise _unreadable(folder, root, exc) from None


def _opened(folder: str, root: Path, name: str | None = None, parent: int | None = None) -> int:
    """A descriptor of ``folder`` (entry ``name`` of the folder open as ``parent``, if given), so its entries are
    listed and stat-ed without resolving its path again."""
    try:
        return os.open(folder if parent is None else name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent)
    except OSError as exc:
        raise _unreadable(folder, root, exc) from None


def _walk_files(
    folder: str, rel: str, root: Path, seen: set[tuple[int, int]], above: tuple = ()
) -> Iterator[tuple[str, Stat]]:
    """Every visible file under ``folder`` (``rel`` relative to ``root``) once, as a path relative to ``root``
    with its ``Stat``.

    ``seen`` holds the (device, inode) of the folders (``folder`` included) and files already listed,
    so a folder reached through links is walked once; a link back to a folder above (``above`` holds
    the keys of ``folder``'s parents) is a usage error, as the folder would never end. Links that lead
    nowhere are listed (reading them says why they fail); fifos, sockets and devices are not. Each folder is
    held open while walked: entries are stat-ed relative to it, a third faster than by whole path.
    """
    fds = [_opened(folder, root)]
    try:
        stack: list[tuple[tuple, str, str, Iterator[str]]] = []
        above, pending = (*above, _key(os.stat(fds[-1]))), iter(_entries(folder, root, fds[-1]))
        while True:
            name = next(pending, None)
            if name is None:
                os.close(fds.pop())
                if not stack:
                    return
                above, folder, rel, pending = stack.pop()
                continue
            child = f"{rel}{os.sep}{name}"
            try:
                st = os.stat(name, dir_fd=fds[-1])
            except OSError:
                yield child, None
                continue
            key = st.st_dev, st.st_ino
            if stat.S_ISDIR(st.st_mode) and key in above:
                path = f"{folder}{os.sep}{name}"
                raise UsageError(
                    f"{path} links back to {os.path.realpath(path)}, so the folder never ends; "
                    "remove or replace that link"
                )
            if key in seen or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                continue
            seen.add(key)
            if stat.S_ISREG(st.st_mode):
                yield child, (st.st_size, st.st_mtime_ns)
                continue
            path = f"{folder}{os.sep}{name}"
            fds.append(_opened(path, root, name, fds[-1]))
            stack.append((above, folder, rel, pending))
            above, folder, rel, pending = (*above, key), path, child, iter(_entries(path, root, fds[-1]))
    finally:
        for fd in fds:
            os.close(fd)


def _class_folders(root: Path) -> dict[str, tuple[int, int] | None]:
    """Each visible sub-folder's (device, inode); None for a second name of a folder already listed."""
    top = _key(root.stat())
    found: dict[str, tuple[int, int] | None] = {}
    for name in _entries(os.fspath(root), root):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            key = _key(os.stat(path))
            if key == top:
                raise UsageError(f"{path} links back to {root}, so the folder never ends; remove or replace that link")
            found[name] = None if key in found.values() else key
    return found


def _class_entries(root: Path) -> dict[str, list[tuple[str, Stat]]]:
    """Each visible sub-folder of ``root`` with its files (relative to ``root``, sorted) and their ``Stat``, every
    real file once.

    A second link to a class folder gets no files; a link that loops is a usage error (``_walk_files``).
    """
    folders = _class_folders(root)
    top = (_key(root.stat()),)
    seen = {*top, *(k for k in folders.values() if k)}
    return {
        name: sorted(_walk_files(os.path.join(root, name), name, root, seen, top)) if key else []
        for name, key in folders.items()
    }


def class_files(root: Path) -> dict[str, list[str]]:
    """Each visible sub-folder of ``root`` with its files (relative to ``root``, sorted), every real file once."""
    return {name: [rel for rel, _ in entries] for name, entries in _class_entries(root).items()}


def scan(root: str | os.PathLike, min_classes: int = 2) -> Dataset:
    """List ``root/<class>/<file>`` images, each real file once; classes are the sub-folder names in sorted order."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root} does not exist; give a folder of class sub-folders (e.g. data/pets/cat/*.jpg)")
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder; give a folder of class sub-folders")
    classes, files, labels, stats, empty = [], [], [], [], []
    for name, listed in _class_entries(root).items():
        found = [(rel, st) for rel, st in listed if has_image_suffix(rel)]  # hidden names are never listed
        if not found:
            empty.append(name)
            continue
        classes.append(name)
        files += [rel for rel, _ in found]
        stats += [st for _, st in found]
        labels += [len(classes) - 1] * len(found)
    if len(classes) < min_classes:
        what = "no class sub-folders with images" if not classes else f"only one class ({classes[0]})"
        raise UsageError(
            f"{root} has {what}; a classifier needs at least {min_classes} sub-folders of images, one per class"
        )
    return Dataset(root, classes, [f.replace(os.sep, "/") for f in files], labels, empty, stats)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """Parse '--split 0.8,0.1,0.1' into three fractions that sum to 1."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6 or parts[0] <= 0:
        raise UsageError(f"--split {text!r} must be three fractions train,val,test that sum to 1, e.g. 0.8,0.1,0.1")
    return parts  # type: ignore[return-value]


def _ranks(seed: int) -> Callable[[str], bytes]:
    """A file's place in its class's seeded order: the SHA-256 of the seed and its path."""
    prefix = hashlib.sha256(f"{seed}:".encode())

    def rank(rel: str) -> bytes:
        h = prefix.copy()
        h.update(rel.encode("utf-8", "surrogateescape"))
        return h.digest()

    return rank


def assign_splits(ds: Dataset, fractions=DEFAULT_FRACTIONS, seed: int = 0) -> tuple[dict[str, str], str]:
    """Map each file to train/val/test: from the dataset's ``split.json`` when present, else stratified.

    The stratified split orders each class by a seeded hash of the file name and cuts it at the
    fractions, so it is the same on every machine and a file keeps its split as others are added
    (near the cut points files may move).
    """
    split_file = ds.root / "split.json"
    given: dict[str, str] = {}
    source = "stratified"
    if split_file.is_file():
        try:
            doc = json.loads(split_file.read_text())
            for split in SPLITS:
                for rel in doc.get(split, []):
                    given[rel] = split
        except (json.JSONDecodeError, AttributeError, TypeError) as exc:
            raise UsageError(f"{split_file} is not a valid split file ({exc}); fix or delete it") from None
        source = "split.json"
    by_class: dict[int, list[str]] = {}
    for rel, label in zip(ds.files, ds.labels, strict=True):
        if rel not in given:
            by_class.setdefault(label, []).append(rel)
    out = {rel: given[rel] for rel in ds.files if rel in given}
    _, f_val, f_test = fractions
    rank = _ranks(seed)
    for members in by_class.values():
        members.sort(key=rank)
        n = len(members)
        n_test = round(n * f_test) if n >= 3 else 0
        n_val = round(n * f_val) if n >= 3 else 0
        if f_test > 0 and n >= 3:
            n_test = max(n_test, 1)
        if f_val > 0 and n >= 3:
            n_val = max(n_val, 1)
        for i, rel in enumerate(members):
            out[rel] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    if given and by_class:
        source = "split.json+stratified"
    return out, source
