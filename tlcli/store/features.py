"""The feature store: one pooled backbone vector per image, per split, reused by file content hash."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections import ChainMap
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
COLUMNS = ("features", "labels", "paths", "hashes", "sizes", "mtimes")
_DTYPES = {
    "features": np.float32,
    "labels": np.int64,
    "paths": str,
    "hashes": str,
    "sizes": np.int64,
    "mtimes": np.int64,
}
_ROW_ORDER = ("paths", "labels", "hashes", "sizes", "mtimes", "features")
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


class Row(NamedTuple):
    """One stored image: where it is, its class, split, content hash, size and mtime, and its vector (None when
    ``write`` is given the vectors by content hash)."""

    path: str
    label: int
    split: str
    digest: str
    size: int
    mtime: int
    vector: np.ndarray | None


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


class Vectors(Mapping):
    """Stored vectors by content hash, read from the memory-mapped segments only when asked for."""

    def __init__(self) -> None:
        self._where: dict[str, tuple[np.ndarray, int]] = {}

    def add(self, hashes: list[str], vectors: np.ndarray, index: list[int]) -> None:
        """Index the live rows of one segment: ``hashes[j]`` is the hash of row ``index[j]`` of ``vectors``."""
        self._where.update(zip(hashes, zip(itertools.repeat(np.asarray(vectors)), index, strict=False), strict=True))

    def __getitem__(self, digest: str) -> np.ndarray:
        vectors, i = self._where[digest]
        return vectors[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, digest: object) -> bool:
        return digest in self._where


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
    _lists: dict[str, dict[str, list]] = field(default_factory=dict, init=False, repr=False, compare=False)

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

    def live(self, segment: dict) -> dict[str, list]:
        """A segment's live rows as lists (their ``index`` in the segment, and each row column), made once however
        often asked for; raises one of ``segments.UNREADABLE``."""
        if segment["file"] not in self._lists:
            cols, index = self.columns(segment), np.flatnonzero(segments.live(segment))
            lists = {k: cols[k][index].tolist() for k in segments.ROW_COLUMNS}
            self._lists[segment["file"]] = {"index": index.tolist(), **lists}
        return self._lists[segment["file"]]

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

    def rows(self) -> list[Row]:
        """Every stored image of every split."""
        found = []
        for name in SPLITS:
            a = self.arrays(name)
            columns = zip(*(a[k] for k in _ROW_ORDER), strict=True)
            found += [Row(str(p), int(lab), name, str(h), int(s), int(m), v) for p, lab, h, s, m, v in columns]
        return found

    def cached(self) -> tuple[Vectors, dict[str, tuple[int, int, str]]]:
        """Vectors by content hash, and (size, mtime_ns, hash) by path, from every readable segment."""
        vectors = Vectors()
        stats: dict[str, tuple[int, int, str]] = {}
        for name in SPLITS:
            for seg in self.segments(name):
                try:
                    live = self.live(seg)
                    mapped = segments.mapped(self.root, seg, self.meta["feature_dim"])
                except segments.UNREADABLE:
                    continue
                vectors.add(live["hashes"], mapped, live["index"])
                facts = zip(live["sizes"], live["mtimes"], live["hashes"], strict=True)
                stats.update(zip(live["paths"], facts, strict=True))
        return vectors, stats

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


def _columns(members: list[Row]) -> dict[str, np.ndarray]:
    """The row columns of one segment (all but its vectors), from its rows."""
    return {
        "labels": np.asarray([r.label for r in members], np.int64),
        "paths": np.asarray([r.path for r in members], dtype=str),
        "hashes": np.asarray([r.digest for r in members], dtype=str),
        "sizes": np.asarray([r.size for r in members], np.int64),
        "mtimes": np.asarray([r.mtime for r in members], np.int64),
    }


def _chunks(members: list[Row], dim: int, vectors: Mapping[str, np.ndarray]) -> segments.Chunks:
    """The vectors of ``members`` (their own, or ``vectors``' for their hash), a few thousand rows at a time."""

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, len(members), _WRITE_CHUNK):
            part = members[start : start + _WRITE_CHUNK]
            found = [vectors[r.digest] if r.vector is None else r.vector for r in part]
            yield np.asarray(found, np.float32).reshape(len(part), dim)

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


def _kept(old: Store | None, name: str, members: list[Row]) -> tuple[list[dict], list[Row]]:
    """The previous store's readable segments of a split, with the rows no longer in ``members`` dropped,
    and the members they do not hold (new or changed files: the rows to append)."""
    held: dict[str, tuple[int, int, tuple]] = {}
    kept: list[dict] = []
    for seg in old.segments(name) if old is not None else []:
        try:
            live = old.live(seg)
            segments.mapped(old.root, seg, old.meta["feature_dim"])
        except segments.UNREADABLE:
            continue
        facts = zip(*(live[k] for k in ("labels", "hashes", "sizes", "mtimes")), strict=True)
        where = zip(itertools.repeat(len(kept)), live["index"], facts, strict=False)
        held.update(zip(live["paths"], where, strict=False))
        kept.append(seg)
    used: set[tuple[int, int]] = set()
    new = []
    for r in members:
        hit = held.get(r.path)
        if hit is not None and hit[2] == (r.label, r.digest, r.size, r.mtime):
            used.add(hit[:2])
        else:
            new.append(r)
    for k, seg in enumerate(kept):
        gone = [i for i in np.flatnonzero(segments.live(seg)).tolist() if (k, i) not in used]
        kept[k] = {**seg, "dropped": sorted([*seg.get("dropped", []), *gone])}
    return [seg for seg in kept if len(seg["dropped"]) < seg["n"]], new


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
    rows: list[Row],
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
    for name in SPLITS:
        members = [r for r in rows if r.split == name]
        kept, new = _kept(old, name, members)
        if new:
            kept.append(segments.write(root, name, _columns(new), _chunks(new, dim, vectors or {})))
        counts = np.bincount(np.asarray([r.label for r in members], np.int64), minlength=len(classes)).tolist()
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
    """What a previous store offers an extract with its key: vectors by content hash, (size, mtime_ns, hash)
    by path and the reasons files did not decode by content hash; or, made otherwise, the key it had."""

    vectors: Mapping[str, np.ndarray]
    stats: dict[str, tuple[int, int, str]]
    bad: dict[str, str]
    replaced: str | None = None

    def over(self, base: Reusable) -> Reusable:
        """These entries on top of ``base``'s (a shard part's over the merged store's)."""
        return Reusable(
            ChainMap(self.vectors, base.vectors), {**base.stats, **self.stats}, {**base.bad, **self.bad}, self.replaced
        )


def reusable(old: Store | None, key: str) -> Reusable:
    """What store ``old`` can reuse for features made by ``key``."""
    if old is None:
        return Reusable({}, {}, {})
    if old.meta.get("key") != key:
        return Reusable({}, {}, {}, old.meta.get("key"))
    vectors, stats = old.cached()
    bad = {b["hash"]: b["reason"] for b in old.meta.get("skipped", []) if b.get("hash")}
    return Reusable(vectors, stats, bad)


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
