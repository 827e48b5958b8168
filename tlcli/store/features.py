"""The feature store: one pooled backbone vector per image, per split, reused by file content hash."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tlcli.errors import UsageError
from tlcli.store import files, locks, segments, shards

STORE_FORMAT = 3
"""2: views with the geometry of Keras' Resizing layer (whole-pixel crop, padding before resampling);
3: each split a list of appended segments (tlcli/store/segments.py) instead of one file."""
META = "meta.json"
EXTRACTOR = "extractor"
OPENVINO = "openvino"
"""The entry of meta.json's extractor naming the graph's OpenVINO conversion (``extractor-<hash>.openvino.npz``)."""
SPLITS = ("train", "val", "test")
_DTYPES = {
    "features": np.float32,
    "labels": np.int64,
    "paths": str,
    "hashes": str,
    "sizes": np.int64,
    "mtimes": np.int64,
}
COMPACT_DROPPED = 0.25
"""A split is rewritten as one segment once this fraction of its segments' rows were dropped."""
MAX_SEGMENTS = 16
"""Past this many segments in a split, all but its largest are merged into one."""
_SHAPE = {
    "key": str,
    "backbone": str,
    "input_size": int,
    "resize": str,
    "feature_dim": int,
    "data_dir": str,
    "classes": list,
    "split_hash": str,
    "splits": dict,
}
"""The fields of meta.json every reader relies on, and their JSON types."""


def _shape_problem(meta) -> str | None:
    """What makes ``meta`` not a store's meta.json (wrong JSON shape), or None."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    wrong = [k for k, kind in _SHAPE.items() if not isinstance(meta.get(k), kind)]
    if wrong:
        return f"{', '.join(wrong)} missing or of the wrong type"
    splits = meta["splits"]
    if not all(
        isinstance(s, dict) and isinstance(s.get("n", 0), int) and isinstance(s.get("segments", []), list)
        for s in splits.values()
    ):
        return "splits is not a table of {n, segments} per split"
    return None


@dataclass
class Rows:
    """Stored images as columns: where each is, its class, split, content hash, size and mtime, and ``vectors``,
    their own vectors in order, or None when ``write`` is given them by content hash."""

    paths: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    hashes: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray
    vectors: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, index: np.ndarray) -> Rows:
        """The rows at ``index`` (positions or a mask), in that order."""
        picked = {k: getattr(self, k)[index] for k in _ROW_FIELDS}
        return Rows(**picked, vectors=None if self.vectors is None else self.vectors[index])

    @classmethod
    def joined(cls, parts: Sequence[Rows]) -> Rows:
        """The rows of ``parts`` one after another (with their vectors when every part has its own)."""
        columns = {k: np.concatenate([getattr(p, k) for p in parts]) for k in _ROW_FIELDS}
        own = all(p.vectors is not None for p in parts)
        return cls(**columns, vectors=np.concatenate([p.vectors for p in parts]) if own and parts else None)


_ROW_FIELDS = ("paths", "labels", "splits", "hashes", "sizes", "mtimes")


@dataclass
class Split:
    """The stored vectors of one split."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]

    @classmethod
    def joined(cls, parts: list[Split]) -> Split:
        """The splits one after another, as one (a view, not a copy, of splits that lie so in one array)."""
        return cls(
            _adjacent([p.features for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [path for p in parts for path in p.paths],
        )

    def take(self, index: np.ndarray) -> Split:
        """The images at ``index``, in that order."""
        return Split(self.features[index], self.labels[index], [self.paths[i] for i in index])


ALIGN = 64
"""Byte alignment of the arrays ``Store.splits`` reads into: what TensorFlow's CPU kernels need of memory they
share (Eigen's largest vector alignment), so the head trains on the store's own copy."""


def aligned_empty(rows: int, dim: int) -> np.ndarray:
    """An uninitialised float32 [rows, dim] array whose memory starts on an ``ALIGN``-byte boundary."""
    raw = np.empty(rows * dim * 4 + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + rows * dim * 4].view(np.float32).reshape(rows, dim)


def _adjacent(arrays: list[np.ndarray]) -> np.ndarray:
    """``arrays`` end to end: a view when they already lie so in one array's memory, else a new array."""
    first = arrays[0]
    owner = first.base if first.base is not None else first
    at = first.ctypes.data
    for a in arrays:
        inside = isinstance(owner, np.ndarray) and a.base is owner and a.dtype == first.dtype
        if not (inside and a.flags.c_contiguous and a.ctypes.data == at):
            return np.concatenate(arrays)
        at += a.nbytes
    shape = (sum(len(a) for a in arrays), *first.shape[1:])
    return np.ndarray(shape, first.dtype, buffer=owner, offset=first.ctypes.data - owner.ctypes.data)


@dataclass
class Stored:
    """A store's live rows in its readable segments as columns (``rows``, split after split), and where each lies:
    ``segment`` indexes ``segs`` (split name and meta.json entry) and ``mapped`` (its memory-mapped vectors),
    ``index`` is the row in that segment."""

    rows: Rows
    segs: list[tuple[str, dict]]
    mapped: list[np.ndarray]
    segment: np.ndarray
    index: np.ndarray

    @functools.cached_property
    def by_path(self) -> dict[str, int]:
        """The row of each stored path."""
        return dict(zip(self.rows.paths.tolist(), range(len(self.rows)), strict=True))

    @functools.cached_property
    def by_hash(self) -> dict[str, int]:
        """A row of each stored content hash."""
        return dict(zip(self.rows.hashes.tolist(), range(len(self.rows)), strict=True))

    def find(self, paths: Sequence[str]) -> np.ndarray:
        """The row of each of ``paths``, -1 where it is not stored."""
        where = self.by_path
        return np.fromiter((where.get(p, -1) for p in paths), np.int64, len(paths))

    def vector(self, row: int) -> np.ndarray:
        """The stored vector of ``row``, read from its segment's mapped file."""
        return self.mapped[self.segment[row]][self.index[row]]


class Vectors(Mapping):
    """Stored vectors by content hash, read from the memory-mapped segments only when asked for (the first
    tables' first)."""

    def __init__(self, tables: Sequence[Stored]) -> None:
        self._tables = tables

    def __getitem__(self, digest: str) -> np.ndarray:
        for table in self._tables:
            row = table.by_hash.get(digest)
            if row is not None:
                return table.vector(row)
        raise KeyError(digest)

    def __iter__(self) -> Iterator[str]:
        return iter({d: None for table in self._tables for d in table.by_hash})

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, digest: object) -> bool:
        return any(digest in table.by_hash for table in self._tables)


@dataclass
class Store:
    """A feature store folder: meta.json, each split's segments (``<split>-<content hash>.npy`` vectors and
    ``.npz`` rows, tlcli/store/segments.py), the traced feature graph ``extractor-<content hash>.pb``
    (so a re-run need not rebuild the backbone), and that graph converted for OpenVINO when extract ran on it.

    meta.json names these files and is written last, so replacing it is the single step that
    commits a new store: a killed extract leaves the previous store whole.
    """

    root: Path
    meta: dict
    _read: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def open(cls, root: str | os.PathLike) -> Store:
        """Open a store written by ``tlcli extract``; one-line error when it is missing or incomplete."""
        root = Path(root)
        if not (root / META).is_file():
            if shards.counts(root):
                raise UsageError(
                    f"{root} holds only shard parts; join them with 'tlcli extract DATA_DIR --out {root} "
                    "--merge-shards'"
                )
            raise UsageError(f"{root} holds no features (no {META}); run 'tlcli extract DATA_DIR --out {root}' first")
        meta = files.read_json(root / META)
        if isinstance(meta, dict) and meta.get("format") != STORE_FORMAT:
            raise UsageError(f"{root} was written by another tlcli version; re-run 'tlcli extract'")
        problem = _shape_problem(meta)
        if problem:
            raise UsageError(
                f"{root / META} is not a feature store's meta.json ({problem}); "
                f"rebuild the store with 'tlcli extract DATA_DIR --out {root}'"
            )
        return cls(root, meta)

    def segments(self, name: str) -> list[dict]:
        """The segments meta.json lists for one split."""
        return self.meta["splits"].get(name, {}).get("segments", [])

    def columns(self, segment: dict) -> dict[str, np.ndarray]:
        """A segment's row columns (``segments.rows``), read once however often asked for; raises one of
        ``segments.UNREADABLE``."""
        if segment["file"] not in self._read:
            self._read[segment["file"]] = segments.rows(self.root, segment)
        return self._read[segment["file"]]

    def _unreadable(self, file: str, exc: Exception) -> UsageError:
        return UsageError(
            f"{self.root / file} is unreadable ({type(exc).__name__}: {exc}); re-run 'tlcli extract' to rebuild it"
        )

    def _rows(self, name: str) -> list[tuple[dict, dict[str, np.ndarray], np.ndarray]]:
        """Each segment of a split with its row columns and live-row mask, checked against meta.json."""
        found = []
        for seg in self.segments(name):
            try:
                found.append((seg, self.columns(seg), segments.live(seg)))
            except segments.UNREADABLE as exc:
                raise self._unreadable(seg["file"], exc) from None
        if sum(int(keep.sum()) for *_, keep in found) != self.meta["splits"].get(name, {}).get("n", 0):
            raise UsageError(f"the {name} segments in {self.root} do not match {META}; re-run 'tlcli extract'")
        return found

    def _read_into(self, found: list, out: np.ndarray) -> None:
        """Copy the live vectors of ``found`` (``_rows``) into ``out``, one segment after another."""
        at = 0
        for seg, _, keep in found:
            n = int(keep.sum())
            try:
                segments.read_into(self.root, seg, out[at : at + n])
            except segments.UNREADABLE as exc:
                raise self._unreadable(seg["vectors"], exc) from None
            at += n

    def _vectors(self, found: list) -> np.ndarray:
        """A split's live vectors: the memory-mapped file itself when one segment holds them all, else one array."""
        dim = self.meta["feature_dim"]
        if len(found) == 1 and found[0][2].all():
            try:
                return segments.mapped(self.root, found[0][0], dim)
            except segments.UNREADABLE as exc:
                raise self._unreadable(found[0][0]["vectors"], exc) from None
        out = np.empty((sum(int(keep.sum()) for *_, keep in found), dim), np.float32)
        self._read_into(found, out)
        return out

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """Every column of one split's stored rows, checked against what meta.json says it holds."""
        found = self._rows(name)
        columns = {
            k: np.concatenate([cols[k][keep] for _, cols, keep in found]) if found else np.zeros(0, _DTYPES[k])
            for k in segments.ROW_COLUMNS
        }
        return {"features": self._vectors(found), **columns}

    def split(self, name: str) -> Split:
        """Load one split (vectors memory-mapped where they lie in one file), checked against meta.json."""
        found = self._rows(name)
        return _split_of(found, self._vectors(found))

    def splits(self, names: Sequence[str] = SPLITS) -> list[Split]:
        """The named splits, their vectors read one after another into one ``ALIGN``-ed array with plain reads
        (not mapped: the only copy held), each split a view of it, so train+val join without a copy."""
        found = [self._rows(name) for name in names]
        ends = np.cumsum([0, *(sum(int(keep.sum()) for *_, keep in rows) for rows in found)]).tolist()
        out = aligned_empty(ends[-1], self.meta["feature_dim"])
        for rows, start, end in zip(found, ends[:-1], ends[1:], strict=True):
            self._read_into(rows, out[start:end])
        return [_split_of(rows, out[a:b]) for rows, a, b in zip(found, ends[:-1], ends[1:], strict=True)]

    def rows(self) -> Rows:
        """Every stored image of every split, with its vector."""
        found = []
        for name in SPLITS:
            a = self.arrays(name)
            columns = {k: a[k] for k in segments.ROW_COLUMNS}
            found.append(Rows(**columns, splits=np.full(len(a["labels"]), name), vectors=np.asarray(a["features"])))
        return Rows.joined(found)

    @functools.cached_property
    def table(self) -> Stored:
        """The live rows of every readable segment as columns (unreadable segments are left out)."""
        segs, mapped, parts, segment, index = [], [], [], [], []
        for name in SPLITS:
            for seg in self.segments(name):
                try:
                    cols, vectors = (
                        segments.rows(self.root, seg),
                        segments.mapped(self.root, seg, self.meta["feature_dim"]),
                    )
                except segments.UNREADABLE:
                    continue
                live = np.flatnonzero(segments.live(seg))
                picked = {k: cols[k][live] for k in segments.ROW_COLUMNS}
                parts.append(Rows(**picked, splits=np.full(len(live), name)))
                segment.append(np.full(len(live), len(segs)))
                index.append(live)
                segs.append((name, seg))
                mapped.append(vectors)
        if not parts:
            return Stored(_no_rows(), [], [], np.zeros(0, np.int64), np.zeros(0, np.int64))
        return Stored(Rows.joined(parts), segs, mapped, np.concatenate(segment), np.concatenate(index))

    def extractor_bytes(self) -> bytes:
        """The traced feature graph meta.json names (KeyError, TypeError or OSError when there is none)."""
        return (self.root / self.meta[EXTRACTOR]["file"]).read_bytes()


_WRITE_CHUNK = 4096
"""Rows of vectors gathered at a time when a segment is written from rows."""


def _split_of(found: list, vectors: np.ndarray) -> Split:
    """A split from its segments' live rows (``Store._rows``) and their vectors."""
    labels = [cols["labels"][keep] for _, cols, keep in found]
    paths = [str(p) for _, cols, keep in found for p in cols["paths"][keep]]
    return Split(vectors, np.concatenate(labels or [np.zeros(0, np.int64)]), paths)


def _no_rows() -> Rows:
    return Rows(*(np.zeros(0, _DTYPES.get(k, str)) for k in _ROW_FIELDS))


def _columns(members: Rows) -> dict[str, np.ndarray]:
    """The row columns of one segment (all but its vectors), from its rows; strings as wide as the segment's
    longest, whatever array they came in, so the same rows always make the same bytes (and segment name)."""
    return {k: np.asarray(getattr(members, k).tolist(), _DTYPES[k]) for k in segments.ROW_COLUMNS}


def _chunks(members: Rows, dim: int, vectors: Mapping[str, np.ndarray]) -> segments.Chunks:
    """The vectors of ``members`` (their own, or ``vectors``' for their hash), a few thousand rows at a time."""

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, len(members), _WRITE_CHUNK):
            stop = min(start + _WRITE_CHUNK, len(members))
            if members.vectors is not None:
                yield np.asarray(members.vectors[start:stop], np.float32).reshape(stop - start, dim)
                continue
            found = [vectors[d] for d in members.hashes[start:stop].tolist()]
            yield np.asarray(found, np.float32).reshape(stop - start, dim)

    return chunks


def _merged(root: Path, name: str, group: list[dict], dim: int) -> dict:
    """One new segment holding the live rows of ``group``, in order (compaction)."""
    parts = [(segments.rows(root, seg), segments.live(seg), seg) for seg in group]
    out = np.empty((sum(int(keep.sum()) for _, keep, _ in parts), dim), np.float32)
    at = 0
    for _, keep, seg in parts:
        segments.read_into(root, seg, out[at : at + int(keep.sum())])
        at += int(keep.sum())
    columns = {k: np.concatenate([cols[k][keep] for cols, keep, _ in parts]) for k in segments.ROW_COLUMNS}
    return segments.write(root, name, {"features": out, **columns})


def _compacted(root: Path, name: str, kept: list[dict], dim: int) -> list[dict]:
    """``kept`` rewritten as one segment once too many of its rows were dropped, or all but its largest merged
    into one when there are too many segments; else ``kept`` itself."""
    total = sum(seg["n"] for seg in kept)
    dropped = sum(len(seg["dropped"]) for seg in kept)
    if dropped > COMPACT_DROPPED * total:
        return [_merged(root, name, kept, dim)]
    if len(kept) > MAX_SEGMENTS:
        largest = max(kept, key=lambda seg: seg["n"] - len(seg["dropped"]))
        return [largest, _merged(root, name, [seg for seg in kept if seg is not largest], dim)]
    return kept


def _kept(old: Store | None, name: str, members: Rows, row: np.ndarray) -> tuple[list[dict], Rows]:
    """The previous store's readable segments of a split, with the rows no longer in ``members`` dropped,
    and the members they do not hold (new or changed files: the rows to append); ``row`` is each member's row in
    the previous store's table (-1 for none)."""
    if old is None:
        return [], members
    table = old.table
    hit = row >= 0
    at = row[hit]
    stored = table.rows
    same = stored.splits[at] == name
    for k in ("labels", "hashes", "sizes", "mtimes"):
        same &= getattr(stored, k)[at] == getattr(members, k)[hit]
    hit[hit] = same
    used = row[hit]
    kept = []
    for k, (split, seg) in enumerate(table.segs):
        if split != name:
            continue
        taken = np.zeros(seg["n"], bool)
        taken[table.index[used[table.segment[used] == k]]] = True
        kept.append({**seg, "dropped": np.flatnonzero(~taken).tolist()})
    return [seg for seg in kept if len(seg["dropped"]) < seg["n"]], members.take(~hit)


def _drop_unreferenced(root: Path, meta: dict) -> None:
    """Delete segment and extractor files the committed meta.json no longer names (earlier stores')."""
    keep = {f for s in meta["splits"].values() for seg in s.get("segments", []) for f in segments.names(seg)}
    saved = meta.get(EXTRACTOR, {})
    keep |= {saved.get("file"), saved.get(OPENVINO, {}).get("file")}
    for path in [*root.glob("*.npz"), *root.glob("*.npy"), *root.glob(f"{EXTRACTOR}-*.pb")]:
        if path.name not in keep and path.stem.split("-")[0] in (*SPLITS, EXTRACTOR):
            path.unlink(missing_ok=True)


def _unchanged(old: Store | None, meta: dict) -> bool:
    """Whether ``meta`` commits the same store as ``old`` (all but the time written), so need not be written."""
    if old is None:
        return False
    ours = json.loads(json.dumps(meta, default=str))
    return {**ours, "written": None} == {**old.meta, "written": None}


def write(
    root: Path,
    rows: Rows,
    classes: list[str],
    meta: dict,
    previous: Store | None = None,
    vectors: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Commit ``rows`` as the store at ``root``: keep ``previous``'s segments, drop its rows that are gone,
    append one segment per split of the rest (their vectors, or for rows without, ``vectors``' by content hash),
    then write ``meta`` naming them and delete unnamed files.

    Segments have content-addressed names and meta.json goes last, so replacing meta.json is the one
    step that commits the new store: a writer killed at any point leaves the previous store whole.
    A store whose rows did not change is left as it is (not even meta.json is written).
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {root}: {exc.strerror}") from None
    dim = meta["feature_dim"]
    same = previous is not None and (previous.meta.get("key"), previous.meta.get("feature_dim")) == (meta["key"], dim)
    old = previous if same else None
    stored = old.table.find(rows.paths.tolist()) if old is not None else np.full(len(rows), -1)
    for name in SPLITS:
        mine = rows.splits == name
        members = rows.take(mine)
        kept, new = _kept(old, name, members, stored[mine])
        if len(new):
            kept.append(segments.write(root, name, _columns(new), _chunks(new, dim, vectors or {})))
        counts = np.bincount(np.asarray(members.labels, np.int64), minlength=len(classes)).tolist()
        meta["splits"][name] = {
            "n": len(members),
            "per_class": dict(zip(classes, counts, strict=True)),
            "segments": _compacted(root, name, kept, dim),
        }
    if not _unchanged(old, meta):
        files.write_json(root / META, meta)
    _drop_unreferenced(root, meta)


def write_extractor(root: Path, data: bytes, suffix: str = ".pb") -> str:
    """Write a traced feature graph (or its OpenVINO conversion) into the store under a content-addressed name;
    the file name."""
    filename = f"{EXTRACTOR}-{hashlib.blake2b(data, digest_size=8).hexdigest()}{suffix}"
    files.write_bytes(root / filename, data)
    return filename


def carry_extractor(part: Store, out: Path) -> dict | None:
    """Copy a shard part's saved feature graph into the merged store, so it is reused like an unsharded one's
    (its OpenVINO conversion is not carried: made again when needed)."""
    try:
        data = part.extractor_bytes()
    except (TypeError, KeyError, OSError):
        return None
    files.write_bytes(out / part.meta[EXTRACTOR]["file"], data)
    return {k: v for k, v in part.meta[EXTRACTOR].items() if k != OPENVINO}


def open_previous(root: Path) -> Store | None:
    """The store already at ``root``, or None if there is none or it does not read."""
    if not (root / META).is_file():
        return None
    try:
        return Store.open(root)
    except UsageError:
        return None


class Reusable(NamedTuple):
    """What previous stores offer an extract with their key: their rows (the first table's over the others', for
    a shard part over the merged store) and the reasons files did not decode by content hash; or, made otherwise,
    the key the store had."""

    tables: tuple[Stored, ...]
    bad: dict[str, str]
    replaced: str | None = None

    def over(self, base: Reusable) -> Reusable:
        """These entries on top of ``base``'s (a shard part's over the merged store's)."""
        return Reusable((*self.tables, *base.tables), {**base.bad, **self.bad}, self.replaced)

    @property
    def vectors(self) -> Vectors:
        """The stored vectors by content hash."""
        return Vectors(self.tables)

    def hashes(self, paths: list[str], sizes: np.ndarray, mtimes: np.ndarray) -> np.ndarray:
        """The stored content hash of each file whose size and mtime are those stored for its path, else ''."""
        found = np.full(len(paths), "", dtype="U32")
        for table in reversed(self.tables):
            row = table.find(paths)
            hit = row >= 0
            same = hit.copy()
            same[hit] = (table.rows.sizes[row[hit]] == sizes[hit]) & (table.rows.mtimes[row[hit]] == mtimes[hit])
            found[same] = table.rows.hashes[row[same]]
        return found


def reusable(old: Store | None, key: str) -> Reusable:
    """What store ``old`` can reuse for features made by ``key``."""
    if old is None:
        return Reusable((), {})
    if old.meta.get("key") != key:
        return Reusable((), {}, old.meta.get("key"))
    bad = {b["hash"]: b["reason"] for b in old.meta.get("skipped", []) if b.get("hash")}
    return Reusable((old.table,), bad)


def open_parts(out: Path, count: int, *, wait: bool, held: contextlib.ExitStack) -> dict[int, Store]:
    """The complete parts of a ``count``-way extract, each locked (held until ``held`` closes)."""
    parts: dict[int, Store] = {}
    for i in range(1, count + 1):
        root = shards.part_dir(out, i, count)
        if root.is_dir():
            what = f"extract --shard {i}/{count} is writing {root}"
            held.enter_context(locks.lock(root / locks.LOCK_NAME, what, wait))
            if (root / META).is_file():
                parts[i] = Store.open(root)
    if not parts:
        raise UsageError(f"no shard part under {out / shards.SHARDS_DIR} is complete; run the workers first")
    return parts
