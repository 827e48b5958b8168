"""The feature store: one pooled backbone vector per image, per split, reused by file content hash."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tlcli.errors import UsageError
from tlcli.store import files, locks, shards

STORE_FORMAT = 2
"""2: views with the geometry of Keras' Resizing layer (whole-pixel crop, padding before resampling)."""
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
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
"""What reading a damaged split file raises (a truncated .npz is a BadZipFile, or an EOFError in a column)."""
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
    if not all(isinstance(s, dict) and isinstance(s.get("n", 0), int) for s in splits.values()):
        return "splits is not a table of {n, file} per split"
    return None


class Row(NamedTuple):
    """One stored image: where it is, its class, split, content hash, size and mtime, and its vector."""

    path: str
    label: int
    split: str
    digest: str
    size: int
    mtime: int
    vector: np.ndarray


@dataclass
class Split:
    """The stored vectors of one split."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]

    @classmethod
    def joined(cls, parts: list[Split]) -> Split:
        """The splits one after another, as one."""
        return cls(
            np.concatenate([p.features for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [path for p in parts for path in p.paths],
        )

    def take(self, index: np.ndarray) -> Split:
        """The images at ``index``, in that order."""
        return Split(self.features[index], self.labels[index], [self.paths[i] for i in index])


@dataclass
class Store:
    """A feature store folder: meta.json plus one ``<split>-<content hash>.npz`` per split and the
    traced feature graph ``extractor-<content hash>.pb`` (so a re-run need not rebuild the backbone), and
    that graph converted for OpenVINO when extract ran on it.

    meta.json names these files and is written last, so replacing it is the single step that
    commits a new store: a killed extract leaves the previous store whole.
    """

    root: Path
    meta: dict

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

    def split_path(self, name: str) -> Path:
        """The file meta.json names for one split."""
        return self.root / self.meta["splits"].get(name, {}).get("file", f"{name}.npz")

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """Every column of one split, checked against what meta.json says it holds."""
        path = self.split_path(name)
        if not self.meta["splits"].get(name, {}).get("n"):
            dim = self.meta["feature_dim"]
            return {k: np.zeros((0, dim) if k == "features" else (0,), _DTYPES[k]) for k in COLUMNS}
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in COLUMNS}
        except _UNREADABLE as exc:
            raise UsageError(
                f"{path} is unreadable ({type(exc).__name__}: {exc}); re-run 'tlcli extract' to rebuild it"
            ) from None
        if len(arrays["paths"]) != self.meta["splits"][name]["n"]:
            raise UsageError(f"{path} does not match {META} (interrupted extract?); re-run 'tlcli extract'")
        return arrays

    def split(self, name: str) -> Split:
        """Load one split, checking it is the file meta.json describes."""
        a = self.arrays(name)
        return Split(a["features"].astype(np.float32), a["labels"].astype(np.int64), [str(p) for p in a["paths"]])

    def rows(self) -> list[Row]:
        """Every stored image of every split."""
        return [
            Row(str(p), int(lab), name, str(h), int(s), int(m), v)
            for name in SPLITS
            for p, lab, h, s, m, v in zip(*(self.arrays(name)[k] for k in _ROW_ORDER), strict=True)
        ]

    def cached(self) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int, str]]]:
        """Vectors by content hash, and (size, mtime_ns, hash) by path, from every readable split."""
        vectors: dict[str, np.ndarray] = {}
        stats: dict[str, tuple[int, int, str]] = {}
        for name in SPLITS:
            path = self.split_path(name)
            if not path.is_file():
                continue
            try:
                with np.load(path, allow_pickle=False) as z:
                    for p, h, s, m, v in zip(
                        z["paths"], z["hashes"], z["sizes"], z["mtimes"], z["features"], strict=True
                    ):
                        vectors[str(h)] = v
                        stats[str(p)] = (int(s), int(m), str(h))
            except _UNREADABLE:
                continue
        return vectors, stats

    def extractor_bytes(self) -> bytes:
        """The traced feature graph meta.json names (KeyError, TypeError or OSError when there is none)."""
        return (self.root / self.meta[EXTRACTOR]["file"]).read_bytes()


def _write_split(root: Path, name: str, arrays: dict) -> str:
    """Write one split under a content-addressed name (atomically) and return the file name."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    filename = f"{name}-{hashlib.blake2b(data, digest_size=8).hexdigest()}.npz"
    files.write_bytes(root / filename, data)
    return filename


def _columns(members: list[Row], dim: int) -> dict[str, np.ndarray]:
    """The arrays of one split file, from its rows."""
    return {
        "features": np.asarray([r.vector for r in members], np.float32).reshape(len(members), dim),
        "labels": np.asarray([r.label for r in members], np.int64),
        "paths": np.asarray([r.path for r in members], dtype=str),
        "hashes": np.asarray([r.digest for r in members], dtype=str),
        "sizes": np.asarray([r.size for r in members], np.int64),
        "mtimes": np.asarray([r.mtime for r in members], np.int64),
    }


def _drop_unreferenced(root: Path, meta: dict) -> None:
    """Delete split and extractor files the committed meta.json no longer names (the previous store's)."""
    keep = {s["file"] for s in meta["splits"].values() if "file" in s}
    saved = meta.get(EXTRACTOR, {})
    keep |= {saved.get("file"), saved.get(OPENVINO, {}).get("file")}
    for path in [*root.glob("*.npz"), *root.glob(f"{EXTRACTOR}-*.pb")]:
        if path.name not in keep and path.stem.split("-")[0] in (*SPLITS, EXTRACTOR):
            path.unlink(missing_ok=True)


def write(root: Path, rows: list[Row], classes: list[str], meta: dict) -> None:
    """Write the three split files, then ``meta`` naming them, then drop the previous store's files.

    Split files have content-addressed names and meta.json goes last, so replacing meta.json is the
    one step that commits the new store: a writer killed at any point leaves the previous store whole.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {root}: {exc.strerror}") from None
    for name in SPLITS:
        columns = _columns([r for r in rows if r.split == name], meta["feature_dim"])
        counts = np.bincount(columns["labels"], minlength=len(classes)).tolist()
        meta["splits"][name] = {
            "n": len(columns["paths"]),
            "file": _write_split(root, name, columns),
            "per_class": dict(zip(classes, counts, strict=True)),
        }
    files.write_json(root / META, meta)
    _drop_unreferenced(root, meta)


def write_extractor(root: Path, data: bytes, suffix: str = ".pb") -> str:
    """Write a traced feature graph (or its OpenVINO conversion) into the store under a content-addressed name;
    the file name."""
    filename = f"{EXTRACTOR}-{hashlib.blake2b(data, digest_size=8).hexdigest()}{suffix}"
    files.write_bytes(root / filename, data)
    return filename


def carry_extractor(part: Store, out: Path) -> dict | None:
    """Copy a shard part's saved feature graph into the merged store, so it is reused like an unsharded one's."""
    try:
        data = part.extractor_bytes()
    except (TypeError, KeyError, OSError):
        return None
    files.write_bytes(out / part.meta[EXTRACTOR]["file"], data)
    return part.meta[EXTRACTOR]


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

    vectors: dict[str, np.ndarray]
    stats: dict[str, tuple[int, int, str]]
    bad: dict[str, str]
    replaced: str | None = None

    def over(self, base: Reusable) -> Reusable:
        """These entries on top of ``base``'s (a shard part's over the merged store's)."""
        return Reusable(
            {**base.vectors, **self.vectors}, {**base.stats, **self.stats}, {**base.bad, **self.bad}, self.replaced
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
