"""The feature store: one pooled backbone vector per image, per split, reused by file content hash."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tlcli.data import datasets, images
from tlcli.errors import UsageError
from tlcli.models import backbones
from tlcli.store import files, locks, runs, shards

STORE_FORMAT = 1
META = "meta.json"
EXTRACTOR = "extractor"
DESCRIBED = ("backbone", "alpha", "input_size", "weights", "weights_sha256", "feature_dim", "precision")
LOCK_NAME = ".tlcli.lock"
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
            if shards.counts(root):
                raise UsageError(
                    f"{root} holds only shard parts; join them with 'tlcli extract DATA_DIR --out {root} "
                    "--merge-shards'"
                )
            raise UsageError(f"{root} holds no features (no {META}); run 'tlcli extract DATA_DIR --out {root}' first")
        meta = files.read_json(root / META)
        if meta.get("format") != STORE_FORMAT:
            raise UsageError(f"{root} was written by another tlcli version; re-run 'tlcli extract'")
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
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"{path} is unreadable ({exc}); re-run 'tlcli extract' to rebuild the store") from None
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
            for name in datasets.SPLITS
            for p, lab, h, s, m, v in zip(*(self.arrays(name)[k] for k in _ROW_ORDER), strict=True)
        ]

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
    files.write_bytes(root / filename, data)
    return filename


def _drop_unreferenced(root: Path, meta: dict) -> None:
    """Delete split and extractor files the committed meta.json no longer names (the previous store's)."""
    keep = {s["file"] for s in meta["splits"].values() if "file" in s}
    keep.add(meta.get(EXTRACTOR, {}).get("file"))
    for path in [*root.glob("*.npz"), *root.glob(f"{EXTRACTOR}-*.pb")]:
        if path.name not in keep and path.stem.split("-")[0] in (*datasets.SPLITS, EXTRACTOR):
            path.unlink(missing_ok=True)


def _write(root: Path, rows: list[Row], classes: list[str], dim: int, meta: dict) -> None:
    """Write the three split files, then ``meta`` naming them, then drop the previous store's files.

    Split files have content-addressed names and meta.json goes last, so replacing meta.json is the
    one step that commits the new store: a writer killed at any point leaves the previous store whole.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {root}: {exc.strerror}") from None
    for name in datasets.SPLITS:
        members = [r for r in rows if r.split == name]
        n = len(members)
        labels = np.asarray([r.label for r in members], np.int64)
        counts = np.bincount(labels, minlength=len(classes)).tolist()
        filename = _write_split(
            root,
            name,
            {
                "features": np.asarray([r.vector for r in members], np.float32).reshape(n, dim),
                "labels": labels,
                "paths": np.asarray([r.path for r in members], dtype=str),
                "hashes": np.asarray([r.digest for r in members], dtype=str),
                "sizes": np.asarray([r.size for r in members], np.int64),
                "mtimes": np.asarray([r.mtime for r in members], np.int64),
            },
        )
        meta["splits"][name] = {"n": n, "file": filename, "per_class": dict(zip(classes, counts, strict=True))}
    files.write_json(root / META, meta)
    _drop_unreferenced(root, meta)


def _plan(data_dir: str | os.PathLike, fractions, seed: int) -> tuple[datasets.Dataset, dict[str, str], str, str]:
    """Scan the whole folder and split it: (dataset, split of each file, split source, hash of both)."""
    ds = datasets.scan(data_dir)
    assignment, split_source = datasets.assign_splits(ds, fractions, seed)
    manifest = hashlib.sha256("\n".join(f"{r}\t{assignment[r]}" for r in sorted(ds.files)).encode()).hexdigest()
    return ds, assignment, split_source, manifest


def _open_previous(root: Path) -> Store | None:
    """The store already at ``root``, or None if there is none or it does not read."""
    if not (root / META).is_file():
        return None
    try:
        return Store.open(root)
    except UsageError:
        return None


def _cache(old: Store | None, key: str) -> tuple[dict, dict, dict, str | None]:
    """What store ``old`` can reuse for ``key``: vectors, file stats, bad files; or the key it replaces."""
    if old is None:
        return {}, {}, {}, None
    if old.meta.get("key") != key:
        return {}, {}, {}, old.meta.get("key")
    vectors, stats = old.cached()
    bad = {b["hash"]: b["reason"] for b in old.meta.get("skipped", []) if b.get("hash")}
    return vectors, stats, bad, None


def _weights_stat(path: str | None) -> list[int] | None:
    """Size and modification time of a weights file, to tell later whether it changed."""
    if path is None:
        return None
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _saved_extractor(old: Store | None, options: dict):
    """The feature graph a previous extract saved in the store, if it still makes the store's vectors.

    That needs a graph that takes any batch size, the same options (backbone, alpha, size, weights,
    resize, flip, precision) and library versions, and the weights file unchanged in size and
    modification time; then the backbone is neither built nor traced again. Anything unreadable
    means building it.
    """
    saved = old.meta.get(EXTRACTOR) if old is not None else None
    if not saved or not saved.get("any_batch") or old.meta.get("versions") != runs.versions():
        return None
    if any(old.meta.get(k) != v for k, v in options.items()):
        return None
    try:
        if _weights_stat(saved["weights_file"]) != saved["weights_stat"]:
            return None
        return images.load_graph((old.root / saved["file"]).read_bytes(), saved["input"], saved["output"])
    except Exception:  # a damaged or foreign cache file is rebuilt, never an error
        return None


def _save_extractor(root: Path, infer, bb: backbones.Backbone) -> dict | None:
    """Write the traced feature graph into the store; its meta.json entry, or None if it reads variables."""
    graph = images.graph_bytes(infer)
    if graph is None:
        return None
    data, input_name, output_name = graph
    filename = f"{EXTRACTOR}-{hashlib.blake2b(data, digest_size=8).hexdigest()}.pb"
    files.write_bytes(root / filename, data)
    return {
        "file": filename,
        "input": input_name,
        "output": output_name,
        "any_batch": True,
        "weights_file": bb.weights_file,
        "weights_stat": _weights_stat(bb.weights_file),
    }


def _carry_extractor(part: Store, out: Path) -> dict | None:
    """Copy a shard part's saved feature graph into the merged store, so it is reused like an unsharded one's."""
    saved = part.meta.get(EXTRACTOR)
    try:
        data = (part.root / saved["file"]).read_bytes()
    except (TypeError, KeyError, OSError):
        return None
    files.write_bytes(out / saved["file"], data)
    return saved


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
    precision: str = "float32",
    shard: tuple[int, int] | None = None,
    progress: Progress | None = None,
    wait: bool = False,
) -> dict:
    """Extract features for every image under ``data_dir`` into the store at ``out``, reusing unchanged ones.

    With ``shard=(i, n)`` only the files of shard i go through the backbone, into their own part
    ``out/shards/i-of-n`` (own lock, so n workers can share one ``out``); the split is still
    computed from the whole folder, so every part agrees with the others and with an unsharded run.
    Returns a summary: counts per split, how many images were extracted or reused, skipped files.
    """
    started = time.perf_counter()
    n_views = len(images.views(resize))
    ds, assignment, split_source, manifest = _plan(data_dir, fractions, seed)
    sp = backbones.spec(backbone)
    options = {
        "backbone": sp.name,
        "alpha": backbones.resolve_alpha(sp, alpha),
        "input_size": size or sp.size,
        "weights": backbones.weights_label(weights),
        "resize": resize,
        "flip_average": flip_average,
        "precision": backbones.check_precision(precision),
    }
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the feature store")
    root = out if shard is None else shards.part_dir(out, *shard)
    mine = [
        (rel, label)
        for rel, label in zip(ds.files, ds.labels, strict=True)
        if shard is None or shards.index_of(rel, shard[1]) == shard[0]
    ]

    with locks.lock(root / LOCK_NAME, f"extract is writing {root}", wait=wait):
        files.remove_leftovers(root)
        old = _open_previous(root)
        infer = _saved_extractor(old, options)
        if infer is not None:
            key, described, extractor = old.meta["key"], {k: old.meta[k] for k in DESCRIBED}, old.meta[EXTRACTOR]
        else:
            bb = backbones.build(backbone, alpha, size, weights, precision=precision)
            key, described, extractor = f"{bb.key}-{resize}{'-flip' if flip_average else ''}", bb.describe(), None
            described["feature_dim"] *= n_views
        vectors, old_stats, old_bad, replaced = _cache(old, key)
        if shard is not None:
            merged_vectors, merged_stats, merged_bad, _ = _cache(_open_previous(out), key)
            vectors, old_stats, old_bad = (
                {**merged_vectors, **vectors},
                {**merged_stats, **old_stats},
                {**merged_bad, **old_bad},
            )
        records = []
        for rel, label in mine:
            full = ds.root / rel
            try:
                st = full.stat()
                prev = old_stats.get(rel)
                digest = prev[2] if prev and prev[:2] == (st.st_size, st.st_mtime_ns) else files.content_hash(full)
            except OSError as exc:
                records.append((rel, label, None, 0, 0, f"unreadable: {exc.strerror}"))
                continue
            records.append((rel, label, digest, st.st_size, st.st_mtime_ns, None))

        todo = [r for r in records if r[5] is None and r[2] not in vectors and r[2] not in old_bad]
        todo_unique = list({r[2]: r for r in todo}.values())
        fresh_bad: dict[str, str] = {}
        if todo_unique:
            if infer is None:
                from tlcli.models.layers import feature_model

                model = feature_model(bb, flip_average, n_views)
                infer = images.inference_function(model, images.pixel_shape(options["input_size"], resize))
            paths = [str(ds.root / r[0]) for r in todo_unique]
            feats, kept, failed = images.apply_graph(
                infer, described["feature_dim"], paths, options["input_size"], resize, batch_size, progress
            )
            if extractor is None:
                extractor = _save_extractor(root, infer, bb)
            for row, i in zip(feats, kept, strict=True):
                vectors[todo_unique[i][2]] = row
            digest_of = {path: rec[2] for path, rec in zip(paths, todo_unique, strict=True)}
            for item in failed:
                fresh_bad[digest_of[item["path"]]] = item["reason"]

        bad_reasons = {**old_bad, **fresh_bad}
        skipped = []
        rows = []
        for rel, label, digest, fsize, mtime, err in records:
            reason = err or bad_reasons.get(digest)
            if reason is not None or digest not in vectors:
                skipped.append({"path": rel, "reason": reason or "not decoded", "hash": digest})
                continue
            rows.append(Row(rel, label, assignment[rel], digest, fsize, mtime, vectors[digest]))

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
            "shards": shard[1] if shard else 1,
            "splits": {},
            "skipped": skipped,
            "empty_classes": ds.empty_classes,
            "versions": runs.versions(),
            "written": runs.timestamp(),
            **({EXTRACTOR: extractor} if extractor else {}),
        }
        if shard is not None:
            meta["shard"] = shard[0]
        _write(root, rows, ds.classes, meta["feature_dim"], meta)
        return {
            "out": str(root),
            "key": key,
            "backbone": described["backbone"],
            "precision": described["precision"],
            "shard": shards.label(*shard) if shard else None,
            "images": len(rows) + len(skipped),
            "stored": len(rows),
            "extracted": len([r for r in todo_unique if r[2] in vectors]),
            "reused": len(rows) - len([r for r in todo if r[2] in vectors]),
            "skipped": skipped,
            "replaced_key": replaced,
            "splits": {k: v["n"] for k, v in meta["splits"].items()},
            "classes": ds.classes,
            "empty_classes": ds.empty_classes,
            "split_source": split_source,
            "seconds": round(time.perf_counter() - started, 3),
        }


_OPTION_OF = {
    "backbone": "--backbone",
    "alpha": "--alpha",
    "input_size": "--size",
    "weights": "--weights",
    "resize": "--resize",
    "flip_average": "--flip",
    "precision": "--precision",
    "split_fractions": "--split",
    "seed": "--seed",
}


def _shard_command(meta: dict, data_dir: str | os.PathLike, out: Path, index: int, count: int) -> str:
    """The extract command that (re)builds one part, with the options another part was made with."""
    opts = ["--backbone", meta["backbone"]]
    if meta.get("alpha") is not None and backbones.spec(meta["backbone"]).alphas:
        opts += ["--alpha", f"{meta['alpha']:g}"]
    opts += ["--size", str(meta["input_size"]), "--resize", meta["resize"]]
    if meta["weights"] != "imagenet":
        opts += ["--weights", meta["weights"]]
    if meta.get("flip_average"):
        opts.append("--flip")
    if meta.get("precision", "float32") != "float32":
        opts += ["--precision", meta["precision"]]
    if tuple(meta["split_fractions"]) != datasets.DEFAULT_FRACTIONS:
        opts += ["--split", ",".join(f"{f:g}" for f in meta["split_fractions"])]
    if meta["seed"]:
        opts += ["--seed", str(meta["seed"])]
    opts += ["--shard", shards.label(index, count)]
    return shlex.join(["tlcli", "extract", str(data_dir), "--out", str(out), *opts])


def _requested(
    backbone: str | None,
    alpha: float | None,
    size: int | None,
    weights: str | None,
    resize: str | None,
    flip_average: bool | None,
    precision: str | None,
    fractions,
    seed: int | None,
) -> dict:
    """Options given to a merge, as the meta.json values they stand for (None: not given)."""
    label = None
    if weights is not None:
        label = weights.lower() if weights.lower() in ("imagenet", "none") else str(Path(weights).resolve())
    return {
        "backbone": backbones.spec(backbone).name if backbone is not None else None,
        "alpha": alpha,
        "input_size": size,
        "weights": label,
        "resize": resize,
        "flip_average": flip_average,
        "precision": backbones.check_precision(precision) if precision is not None else None,
        "split_fractions": list(fractions) if fractions is not None else None,
        "seed": seed,
    }


def _open_parts(out: Path, count: int, wait: bool, held: contextlib.ExitStack) -> dict[int, Store]:
    """The complete parts of a ``count``-way extract, each locked (held until ``held`` closes)."""
    parts: dict[int, Store] = {}
    for i in range(1, count + 1):
        root = shards.part_dir(out, i, count)
        if root.is_dir():
            held.enter_context(locks.lock(root / LOCK_NAME, f"extract --shard {i}/{count} is writing {root}", wait))
            if (root / META).is_file():
                parts[i] = Store.open(root)
    if not parts:
        raise UsageError(f"no shard part under {out / shards.SHARDS_DIR} is complete; run the workers first")
    return parts


def _check_parts(parts: dict[int, Store], count: int, rerun: Callable[[int], str]) -> None:
    """Refuse parts that were renamed or made with other options or another data folder than the first part."""
    first = min(parts)
    ref = parts[first].meta
    for i, part in parts.items():
        meta = part.meta
        if (meta.get("shard"), meta.get("shards")) != (i, count):
            raise UsageError(f"{part.root} does not hold shard {i}/{count} (renamed?); delete it and run '{rerun(i)}'")
        for field, what in (
            ("key", "features"),
            ("data_dir", "data folder"),
            ("split_fractions", "--split"),
            ("seed", "--seed"),
        ):
            if meta.get(field) != ref.get(field):
                raise UsageError(
                    f"shard {i}/{count} has {what} {meta.get(field)} but shard {first}/{count} has "
                    f"{ref.get(field)}; re-run the wrong one with the others' options, e.g. '{rerun(i)}'"
                )


def merge_shards(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    backbone: str | None = None,
    alpha: float | None = None,
    size: int | None = None,
    weights: str | None = None,
    resize: str | None = None,
    flip_average: bool | None = None,
    precision: str | None = None,
    fractions=None,
    seed: int | None = None,
    wait: bool = False,
) -> dict:
    """Join the parts ``extract --shard i/n`` wrote under ``out/shards`` into the store at ``out``.

    The result is the store an unsharded extract of the same folder writes: same files in the same
    order, same splits and meta.json keys, file stats kept so later runs stay incremental. The
    options (backbone, seed, ...) come from the parts; any given here must match them. Missing
    parts, parts made with other options or from another state of the folder are refused with
    the command that rebuilds them.
    """
    started = time.perf_counter()
    out = Path(out)
    found = shards.counts(out)
    if not found:
        raise UsageError(
            f"{out} holds no shard parts ({out / shards.SHARDS_DIR}/I-of-N); "
            f"run 'tlcli extract {data_dir} --out {out} --shard I/N' on each of the N workers first"
        )
    if len(found) > 1:
        raise UsageError(
            f"{out / shards.SHARDS_DIR} holds parts for {' and '.join(map(str, found))} shards; "
            "delete the folders of the stale count, then merge again"
        )
    count = found[0]
    with contextlib.ExitStack() as held:
        held.enter_context(locks.lock(out / LOCK_NAME, f"extract is writing {out}", wait=wait))
        files.remove_leftovers(out)
        parts = _open_parts(out, count, wait, held)
        first = min(parts)
        ref = parts[first].meta

        def rerun(i: int) -> str:
            return _shard_command(ref, data_dir, out, i, count)

        missing = [i for i in range(1, count + 1) if i not in parts]
        if missing:
            names = ", ".join(shards.label(i, count) for i in missing)
            others = ", ".join(shards.label(i, count) for i in missing[1:])
            raise UsageError(
                f"shard{'s' if others else ''} {names} missing in {out / shards.SHARDS_DIR}; run '{rerun(missing[0])}'"
                + (f" (and likewise --shard {others})" if others else "")
                + ", then merge again"
            )
        _check_parts(parts, count, rerun)
        wanted = _requested(backbone, alpha, size, weights, resize, flip_average, precision, fractions, seed)
        for field, value in wanted.items():
            have = ref.get(field, "float32" if field == "precision" else None)
            if value is not None and value != have:
                raise UsageError(
                    f"the parts in {out / shards.SHARDS_DIR} were made with {_OPTION_OF[field]} {have}, not {value}; "
                    "merge without that option, or re-run every shard with it"
                )
        ds, _, split_source, manifest = _plan(data_dir, ref["split_fractions"], ref["seed"])
        if str(ds.root.resolve()) != ref["data_dir"]:
            raise UsageError(
                f"the parts were extracted from {ref['data_dir']}, not {ds.root.resolve()}; give that DATA_DIR"
            )
        stale = [i for i, part in parts.items() if part.meta["split_hash"] != manifest]
        if stale:
            names = ", ".join(shards.label(i, count) for i in stale)
            raise UsageError(
                f"files in {data_dir} were added, removed or renamed since shard {names} ran; re-run "
                f"{'every shard' if len(stale) == count else 'those'} (only new files are extracted), "
                f"e.g. '{rerun(stale[0])}', then merge again"
            )
        order = {rel: k for k, rel in enumerate(ds.files)}
        rows: list[Row] = []
        skipped: list[dict] = []
        for i, part in parts.items():
            try:
                part_rows = part.rows()
            except UsageError:
                raise UsageError(f"shard {i}/{count} in {part.root} is unreadable; re-run '{rerun(i)}'") from None
            listed = {r.path for r in part_rows} | {s["path"] for s in part.meta.get("skipped", [])}
            if listed != {rel for rel in ds.files if shards.index_of(rel, count) == i}:
                raise UsageError(
                    f"shard {i}/{count} in {part.root} does not hold its shard's files; re-run '{rerun(i)}'"
                )
            rows += part_rows
            skipped += part.meta.get("skipped", [])
        rows.sort(key=lambda r: order[r.path])
        skipped.sort(key=lambda s: order[s["path"]])
        replaced = _cache(_open_previous(out), ref["key"])[3]
        meta = {k: v for k, v in ref.items() if k not in ("shard", EXTRACTOR)}
        meta.update(splits={}, skipped=skipped, written=runs.timestamp())
        graph = _carry_extractor(parts[first], out)
        if graph:
            meta[EXTRACTOR] = graph
        _write(out, rows, ds.classes, ref["feature_dim"], meta)
        return {
            "out": str(out),
            "key": ref["key"],
            "backbone": ref["backbone"],
            "precision": ref.get("precision", "float32"),
            "merged": count,
            "images": len(rows) + len(skipped),
            "stored": len(rows),
            "extracted": 0,
            "reused": len(rows),
            "skipped": skipped,
            "replaced_key": replaced,
            "splits": {k: v["n"] for k, v in meta["splits"].items()},
            "classes": ds.classes,
            "empty_classes": ds.empty_classes,
            "split_source": split_source,
            "seconds": round(time.perf_counter() - started, 3),
        }
