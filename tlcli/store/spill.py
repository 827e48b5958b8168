"""New vectors spilled to an unnamed scratch file beside the store as they are made, so a full extract holds no
copy of them in memory, and read back a row at a time when their segments are written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np


class Spill(Mapping):
    """Vectors by content hash in a scratch file (unlinked at creation: nothing is left behind, even by a kill),
    read with plain reads so neither the file nor its pages count towards the process's memory."""

    def __init__(self, folder: Path, dim: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._folder = folder
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".spill-", suffix=".tmp")
        self._row = dim * 4
        self._count = 0
        self._index: dict[str, int] = {}

    def add(self, digests: Sequence[str], vectors: np.ndarray) -> None:
        """Append one batch: ``vectors[i]`` is the vector of ``digests[i]``."""
        data = np.ascontiguousarray(vectors, np.float32)
        if not data.size:
            return
        try:
            self._file.write(memoryview(data).cast("B"))
            self._file.flush()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self._folder)) from exc
        self._index.update((d, self._count + i) for i, d in enumerate(digests))
        self._count += len(digests)

    def __getitem__(self, digest: str) -> np.ndarray:
        data = os.pread(self._file.fileno(), self._row, self._index[digest] * self._row)
        return np.frombuffer(data, np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, digest: object) -> bool:
        return digest in self._index

    def close(self) -> None:
        """Release the scratch file (its space goes with it)."""
        self._file.close()
