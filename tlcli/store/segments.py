"""Segments of a feature store split: append-only, each a pair of files named by their content.

A segment's vectors are an uncompressed ``.npy`` that readers memory-map; its row columns (labels,
paths, hashes, sizes, mtimes) are a small ``.npz`` beside it. meta.json lists a split's segments and
the rows of each that later runs dropped, so a run writes only its new rows and a new meta.json.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from tlcli.store import files

Chunks = Callable[[], Iterable[np.ndarray]]
"""A segment's vectors as a function that gives them, anew each call, as float32 chunks of rows."""
ROW_COLUMNS = ("labels", "paths", "hashes", "sizes", "mtimes")
UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
"""What reading a damaged segment raises (a truncated .npz is a BadZipFile, a truncated .npy a ValueError)."""
_CHUNK = 8192
"""Rows read at a time when a segment's dropped rows are skipped on loading."""


def write(root: Path, split: str, columns: dict[str, np.ndarray], vectors: Chunks | None = None) -> dict:
    """Write one segment atomically (vectors, then rows) under a content-addressed name; its meta.json entry.

    The vectors are ``columns["features"]``, or ``vectors``: a function giving them anew as float32 chunks of rows
    (read twice, to name the file and to write it), so that no copy of them all is held in memory.
    """
    whole = np.ascontiguousarray(columns["features"], np.float32) if vectors is None else None
    chunks = (lambda: [whole]) if vectors is None else vectors
    n = len(columns["labels"])
    buf = io.BytesIO()
    np.savez(buf, **{k: columns[k] for k in ROW_COLUMNS})
    rows = buf.getvalue()
    digest = hashlib.blake2b(rows, digest_size=8)
    dim = None
    for chunk in chunks():
        digest.update(_bytes(chunk))
        dim = chunk.shape[1]
    stem = f"{split}-{digest.hexdigest()}"
    with files.atomic_path(root / f"{stem}.npy") as tmp, open(tmp, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (n, dim or 0)})
        for chunk in chunks():
            f.write(_bytes(chunk))
    files.write_bytes(root / f"{stem}.npz", rows)
    return {"file": f"{stem}.npz", "vectors": f"{stem}.npy", "n": n, "dropped": []}


def _bytes(chunk: np.ndarray) -> memoryview | bytes:
    """A chunk of vectors as float32 bytes, without a copy where it already is one."""
    data = np.ascontiguousarray(chunk, np.float32)
    return memoryview(data).cast("B") if data.size else b""


def names(segment: dict) -> tuple[str, str]:
    """The two files of a segment."""
    return segment["file"], segment["vectors"]


def live(segment: dict) -> np.ndarray:
    """A mask of the rows of ``segment`` that are still stored (not dropped by a later run)."""
    keep = np.ones(segment["n"], bool)
    keep[np.asarray(segment.get("dropped", []), np.int64)] = False
    return keep


def rows(root: Path, segment: dict) -> dict[str, np.ndarray]:
    """Every row column of a segment, dropped rows included; raises one of UNREADABLE when damaged."""
    with np.load(root / segment["file"], allow_pickle=False) as z:
        found = {k: z[k] for k in ROW_COLUMNS}
    if any(len(v) != segment["n"] for v in found.values()):
        raise ValueError(f"holds {len(found['paths'])} rows, meta.json says {segment['n']}")
    return found


def mapped(root: Path, segment: dict, dim: int) -> np.ndarray:
    """A segment's vectors, memory-mapped read-only (dropped rows included); raises one of UNREADABLE."""
    vectors = np.load(root / segment["vectors"], mmap_mode="r", allow_pickle=False)
    if vectors.shape != (segment["n"], dim) or vectors.dtype != np.float32:
        raise ValueError(f"holds vectors {vectors.shape} {vectors.dtype}, meta.json says ({segment['n']}, {dim})")
    return vectors


def _header(f, segment: dict, dim: int) -> None:
    """Read a .npy header, checking it holds the float32 (n, dim) vectors meta.json says; raises ValueError."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if shape != (segment["n"], dim) or fortran or dtype != np.float32:
        raise ValueError(f"holds vectors {shape} {dtype}, meta.json says ({segment['n']}, {dim})")


def read_into(root: Path, segment: dict, out: np.ndarray) -> None:
    """Copy a segment's live vectors into ``out`` (as many rows) with plain reads, a chunk at a time, so that
    only ``out`` is held in memory (mapped pages would count too); raises one of UNREADABLE."""
    keep = live(segment)
    n, dim = segment["n"], out.shape[1]
    buf = out if keep.all() else np.empty((min(_CHUNK, n), dim), np.float32)
    at = 0
    with open(root / segment["vectors"], "rb") as f:
        _header(f, segment, dim)
        for start in range(0, n, _CHUNK):
            k = min(_CHUNK, n - start)
            target = buf[start : start + k] if buf is out else buf[:k]
            if f.readinto(memoryview(target).cast("B")) != target.nbytes:
                raise EOFError(f"{segment['vectors']} is shorter than its {n} rows")
            if buf is not out:
                chunk = keep[start : start + k]
                out[at : at + int(chunk.sum())] = target[chunk]
                at += int(chunk.sum())
