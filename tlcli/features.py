"""The feature store: one pooled backbone vector per image, per split, reused by file content hash."""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlcli import artifacts, backbones, datasets, images, locks
from tlcli.errors import UsageError

STORE_FORMAT = 1
META = "meta.json"
EXTRACTOR = "extractor"
DESCRIBED = ("backbone", "alpha", "input_size", "weights", "weights_sha256", "feature_dim")
LOCK_NAME = ".tlcli.lock"


def file_digest(path: str | os.PathLike) -> str:
    """Content hash that identifies an image file across renames and re-runs."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Split:
    """The stored vectors of one split."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]


@dataclass
class Store:
    """A feature store folder: meta.json plus one ``<split>-<content hash>.npz`` per split and the
    traced feature graph ``extractor-<content hash>.pb`` (so a re-run need not rebuild the backbone).

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
            raise UsageError(f"{root} holds no features (no {META}); run 'tlcli extract DATA_DIR --out {root}' first")
        meta = artifacts.read_json(root / META)
        if meta.get("format") != STORE_FORMAT:
            raise UsageError(f"{root} was written by another tlcli version; re-run 'tlcli extract'")
        return cls(root, meta)

    def split_path(self, name: str) -> Path:
        """The file meta.json names for one split."""
        return self.root / self.meta["splits"].get(name, {}).get("file", f"{name}.npz")

    def split(self, name: str) -> Split:
        """Load one split, checking it is the file meta.json describes."""
        path = self.split_path(name)
        expect = self.meta["splits"].get(name, {})
        if not expect.get("n"):
            return Split(np.zeros((0, self.meta["feature_dim"]), np.float32), np.zeros((0,), np.int64), [])
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("features", "labels", "paths")}
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"{path} is unreadable ({exc}); re-run 'tlcli extract' to rebuild the store") from None
        if len(arrays["paths"]) != expect["n"]:
            raise UsageError(f"{path} does not match {META} (interrupted extract?); re-run 'tlcli extract'")
        return Split(
            arrays["features"].astype(np.float32), arrays["labels"].astype(np.int64), [str(p) for p in arrays["paths"]]
        )

    def cached(self) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int, str]]]:
        """Vectors by content hash, and (size, mtime_ns, hash) by path, from every readable split."""
        vectors: dict[str, np.ndarray] = {}
        stats: dict[str, tuple[int, int, str]] = {}
        for name in datasets.SPLITS:
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
            except (OSError, ValueError, KeyError):
                continue
        return vectors, stats


def _write_split(root: Path, name: str, arrays: dict) -> str:
    """Write one split under a content-addressed name (atomically) and return the file name."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    filename = f"{name}-{hashlib.blake2b(data, digest_size=8).hexdigest()}.npz"
    artifacts.write_bytes(root / filename, data)
    return filename


def _drop_unreferenced(root: Path, meta: dict) -> None:
    """Delete split and extractor files the committed meta.json no longer names (the previous store's)."""
    keep = {s["file"] for s in meta["splits"].values() if "file" in s}
    keep.add(meta.get(EXTRACTOR, {}).get("file"))
    for path in [*root.glob("*.npz"), *root.glob(f"{EXTRACTOR}-*.pb")]:
        if path.name not in keep and path.stem.split("-")[0] in (*datasets.SPLITS, EXTRACTOR):
            path.unlink(missing_ok=True)


def _weights_stat(path: str | None) -> list[int] | None:
    """Size and modification time of a weights file, to tell later whether it changed."""
    if path is None:
        return None
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _saved_extractor(old: Store | None, options: dict, batch_size: int):
    """The feature graph a previous extract saved in the store, if it still makes the store's vectors.

    That needs the same options (backbone, alpha, size, weights, resize, flip), batch size and
    library versions, and the weights file unchanged in size and modification time; then the
    backbone is neither built nor traced again. Anything unreadable means building it.
    """
    saved = old.meta.get(EXTRACTOR) if old is not None else None
    if not saved or saved.get("batch_size") != batch_size or old.meta.get("versions") != artifacts.versions():
        return None
    if any(old.meta.get(k) != v for k, v in options.items()):
        return None
    try:
        if _weights_stat(saved["weights_file"]) != saved["weights_stat"]:
            return None
        return images.load_graph((old.root / saved["file"]).read_bytes(), saved["input"], saved["output"])
    except Exception:  # a damaged or foreign cache file is rebuilt, never an error
        return None


def _save_extractor(root: Path, infer, bb: backbones.Backbone, batch_size: int) -> dict | None:
    """Write the traced feature graph into the store; its meta.json entry, or None if it reads variables."""
    graph = images.graph_bytes(infer)
    if graph is None:
        return None
    data, input_name, output_name = graph
    filename = f"{EXTRACTOR}-{hashlib.blake2b(data, digest_size=8).hexdigest()}.pb"
    artifacts.write_bytes(root / filename, data)
    return {
        "file": filename,
        "input": input_name,
        "output": output_name,
        "batch_size": batch_size,
        "weights_file": bb.weights_file,
        "weights_stat": _weights_stat(bb.weights_file),
    }


Progress = Callable[[int, int], None]


def extract(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    backbone: str = "mobilenet",
    alpha: float | None = None,
    size: int | None = None,
    weights: str = "imagenet",
    resize: str = images.DEFAULT_RESIZE,
    flip_average: bool = False,
    fractions=datasets.DEFAULT_FRACTIONS,
    seed: int = 0,
    batch_size: int = 32,
    progress: Progress | None = None,
    wait: bool = False,
) -> dict:
    """Extract features for every image under ``data_dir`` into the store at ``out``, reusing unchanged ones.

    Returns a summary: counts per split, how many images were extracted or reused, skipped files.
    """
    started = time.perf_counter()
    n_views = len(images.views(resize))
    ds = datasets.scan(data_dir)
    assignment, split_source = datasets.assign_splits(ds, fractions, seed)
    sp = backbones.spec(backbone)
    options = {
        "backbone": sp.name,
        "alpha": backbones.resolve_alpha(sp, alpha),
        "input_size": size or sp.size,
        "weights": backbones.weights_label(weights),
        "resize": resize,
        "flip_average": flip_average,
    }
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the feature store")

    with locks.lock(out / LOCK_NAME, f"extract is writing {out}", wait=wait):
        artifacts.remove_leftovers(out)
        old = None
        if (out / META).is_file():
            try:
                old = Store.open(out)
            except UsageError:
                old = None
        infer = _saved_extractor(old, options, batch_size)
        if infer is not None:
            key, described, extractor = old.meta["key"], {k: old.meta[k] for k in DESCRIBED}, old.meta[EXTRACTOR]
        else:
            bb = backbones.build(backbone, alpha, size, weights)
            key, described, extractor = f"{bb.key}-{resize}{'-flip' if flip_average else ''}", bb.describe(), None
            described["feature_dim"] *= n_views
        vectors: dict[str, np.ndarray] = {}
        old_stats: dict[str, tuple[int, int, str]] = {}
        old_bad: dict[str, str] = {}
        replaced = None
        if old is not None and old.meta.get("key") == key:
            vectors, old_stats = old.cached()
            old_bad = {b["hash"]: b["reason"] for b in old.meta.get("skipped", []) if b.get("hash")}
        elif old is not None:
            replaced = old.meta.get("key")

        records = []
        for rel, label in zip(ds.files, ds.labels, strict=True):
            full = ds.root / rel
            try:
                st = full.stat()
                prev = old_stats.get(rel)
                digest = prev[2] if prev and prev[:2] == (st.st_size, st.st_mtime_ns) else file_digest(full)
            except OSError as exc:
                records.append((rel, label, None, 0, 0, f"unreadable: {exc.strerror}"))
                continue
            records.append((rel, label, digest, st.st_size, st.st_mtime_ns, None))

        todo = [r for r in records if r[5] is None and r[2] not in vectors and r[2] not in old_bad]
        todo_unique = list({r[2]: r for r in todo}.values())
        fresh_bad: dict[str, str] = {}
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {out}: {exc.strerror}") from None
        if todo_unique:
            if infer is None:
                from tlcli.layers import feature_model

                model = feature_model(bb, flip_average, n_views)
                infer = images.inference_function(model, batch_size, images.pixel_shape(options["input_size"], resize))
            paths = [str(ds.root / r[0]) for r in todo_unique]
            feats, kept, failed = images.apply_graph(
                infer, described["feature_dim"], paths, options["input_size"], resize, batch_size, progress
            )
            if extractor is None:
                extractor = _save_extractor(out, infer, bb, batch_size)
            for row, i in zip(feats, kept, strict=True):
                vectors[todo_unique[i][2]] = row
            digest_of = {path: rec[2] for path, rec in zip(paths, todo_unique, strict=True)}
            for item in failed:
                fresh_bad[digest_of[item["path"]]] = item["reason"]

        bad_reasons = {**old_bad, **fresh_bad}
        skipped = []
        per_split: dict[str, dict[str, list]] = {
            s: {k: [] for k in ("features", "labels", "paths", "hashes", "sizes", "mtimes")} for s in datasets.SPLITS
        }
        for rel, label, digest, fsize, mtime, err in records:
            reason = err or bad_reasons.get(digest)
            if reason is not None or digest not in vectors:
                skipped.append({"path": rel, "reason": reason or "not decoded", "hash": digest})
                continue
            arrays = per_split[assignment[rel]]
            arrays["features"].append(vectors[digest])
            arrays["labels"].append(label)
            arrays["paths"].append(rel)
            arrays["hashes"].append(digest)
            arrays["sizes"].append(fsize)
            arrays["mtimes"].append(mtime)

        dim = described["feature_dim"]
        split_meta = {}
        for name, arrays in per_split.items():
            n = len(arrays["paths"])
            counts = np.bincount(np.asarray(arrays["labels"], np.int64), minlength=len(ds.classes)).tolist()
            filename = _write_split(
                out,
                name,
                {
                    "features": np.asarray(arrays["features"], np.float32).reshape(n, dim),
                    "labels": np.asarray(arrays["labels"], np.int64),
                    "paths": np.asarray(arrays["paths"], dtype=str),
                    "hashes": np.asarray(arrays["hashes"], dtype=str),
                    "sizes": np.asarray(arrays["sizes"], np.int64),
                    "mtimes": np.asarray(arrays["mtimes"], np.int64),
                },
            )
            split_meta[name] = {"n": n, "file": filename, "per_class": dict(zip(ds.classes, counts, strict=True))}
        manifest = hashlib.sha256("\n".join(f"{r}\t{assignment[r]}" for r in sorted(ds.files)).encode()).hexdigest()
        meta = {
            "format": STORE_FORMAT,
            "key": key,
            **described,
            "resize": resize,
            "flip_average": flip_average,
            "data_dir": str(ds.root.resolve()),
            "classes": ds.classes,
            "split_source": split_source,
            "split_fractions": list(fractions),
            "seed": seed,
            "split_hash": manifest,
            "splits": split_meta,
            "skipped": skipped,
            "empty_classes": ds.empty_classes,
            "versions": artifacts.versions(),
            "written": artifacts.timestamp(),
            **({EXTRACTOR: extractor} if extractor else {}),
        }
        artifacts.write_json(out / META, meta)
        _drop_unreferenced(out, meta)
        n_ok = sum(s["n"] for s in split_meta.values())
        return {
            "out": str(out),
            "key": key,
            "backbone": described["backbone"],
            "images": n_ok + len(skipped),
            "stored": n_ok,
            "extracted": len([r for r in todo_unique if r[2] in vectors]),
            "reused": n_ok - len([r for r in todo if r[2] in vectors]),
            "skipped": skipped,
            "replaced_key": replaced,
            "splits": {k: v["n"] for k, v in split_meta.items()},
            "classes": ds.classes,
            "empty_classes": ds.empty_classes,
            "split_source": split_source,
            "seconds": round(time.perf_counter() - started, 3),
        }
