"""Extraction: a frozen backbone over a folder of photos, one vector per image into the feature store
(incremental, optionally one shard of an array job), and the join of the shard parts into one store."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shlex
import time
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tlcli.data import datasets, images
from tlcli.errors import UsageError
from tlcli.models import backbones, devices, engines, graph
from tlcli.store import features, files, locks, runs, shards
from tlcli.store.features import EXTRACTOR, Store
from tlcli.store.spill import Spill
from tlcli.train import recipes
from tlcli.train.recipes import EXTRACT, ExtractRecipe, option

Progress = Callable[[int, int], None]
DESCRIBED = ("backbone", "alpha", "input_size", "weights", "weights_sha256", "feature_dim", "precision")
_META_KEY = {"size": "input_size", "fractions": "split_fractions"}
"""Recipe fields that meta.json records under another name."""
_MERGE_CHECKED = ("backbone", "alpha", "size", "weights", "resize", "flip_average", "precision", "fractions", "seed")


class _Plan(NamedTuple):
    """The whole folder and its split: files and classes, each file's split, where it came from, a hash of both."""

    ds: datasets.Dataset
    assignment: dict[str, str]
    source: str
    manifest: str


class _Found(NamedTuple):
    """This extract's image files as columns: path, class, content hash, size and mtime; why the unreadable ones
    failed, by position (their hash is ''); and which files the store holds as they are (``known``)."""

    paths: list[str]
    labels: np.ndarray
    hashes: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray
    errors: dict[int, str]
    known: np.ndarray


@dataclass
class _Extractor:
    """The feature function of an extract and what the store records of it; ``infer`` is loaded (``load``, the
    saved graph) or traced only when some image is new, and ``saved`` is the meta.json entry of its graph file."""

    key: str
    described: dict
    size: int
    saved: dict | None = None
    infer: Callable | None = None
    backbone: backbones.Backbone | None = None
    traced: str = "float32"
    load: Callable[[], Callable | None] | None = None


def _plan(data_dir: str | os.PathLike, fractions, seed: int) -> _Plan:
    """Scan the whole folder and split it (a shard too, so every part agrees with an unsharded run)."""
    ds = datasets.scan(data_dir)
    assignment, source = datasets.assign_splits(ds, fractions, seed)
    manifest = hashlib.sha256(os.fsencode("\n".join(f"{r}\t{assignment[r]}" for r in sorted(ds.files)))).hexdigest()
    return _Plan(ds, assignment, source, manifest)


def _input_size(recipe: ExtractRecipe) -> tuple[int, str]:
    """The recipe's input size and whether it was given, measured best for the backbone, or its ImageNet size."""
    sp = backbones.spec(recipe.backbone)
    return recipes.input_size(sp.name, backbones.resolve_alpha(sp, recipe.alpha), recipe.size, sp.size)


def _options(recipe: ExtractRecipe) -> dict:
    """The recipe's meta.json values that a saved feature graph must match; usage errors for bad ones."""
    sp = backbones.spec(recipe.backbone)
    return {
        "backbone": sp.name,
        "alpha": backbones.resolve_alpha(sp, recipe.alpha),
        "input_size": _input_size(recipe)[0],
        "weights": backbones.weights_label(recipe.weights),
        "resize": recipe.resize,
        "flip_average": recipe.flip_average,
        "precision": backbones.check_precision(recipe.precision),
    }


def _weights_stat(path: str | None) -> list[int] | None:
    """Size and modification time of a weights file, to tell later whether it changed."""
    if path is None:
        return None
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _graph_holds(old: Store | None, options: dict, traced: str) -> bool:
    """Whether the feature graph a previous extract saved in the store still makes the store's vectors.

    That needs a graph that takes any batch size, the same options (backbone, alpha, size, weights,
    resize, flip, precision) traced in the ``traced`` precision, library versions, and the weights file
    unchanged in size and modification time; then the backbone is neither built nor traced again.
    """
    saved = old.meta.get(EXTRACTOR) if old is not None else None
    if not saved or not saved.get("any_batch") or old.meta.get("versions") != runs.versions():
        return False
    if any(old.meta.get(k) != v for k, v in options.items()):
        return False
    if saved.get("traced", options["precision"]) != traced:
        return False
    try:
        return _weights_stat(saved["weights_file"]) == saved["weights_stat"]
    except (OSError, KeyError, TypeError):
        return False


def _saved_graph(old: Store) -> Callable | None:
    """Load the previous store's feature graph; None when it does not load (then the backbone is built)."""
    saved = old.meta[EXTRACTOR]
    try:
        return graph.load_graph(old.extractor_bytes(), saved["input"], saved["output"])
    except Exception:  # a damaged or foreign cache file is rebuilt, never an error
        return None


def _built(recipe: ExtractRecipe, options: dict, traced: str) -> _Extractor:
    """The backbone of ``recipe``, built in the ``traced`` precision, and the key and description of its
    features (which name the recipe's precision)."""
    bb = backbones.build(recipe.backbone, recipe.alpha, options["input_size"], recipe.weights, precision=traced)
    bb = replace(bb, precision=recipe.precision)
    described = bb.describe()
    described["feature_dim"] *= len(images.views(recipe.resize))
    key = f"{bb.key}-{recipe.resize}{'-flip' if recipe.flip_average else ''}"
    return _Extractor(key, described, options["input_size"], backbone=bb, traced=traced)


def _extractor(
    old: Store | None, recipe: ExtractRecipe, options: dict, engine: str, ready: Callable[[], None]
) -> _Extractor:
    """The previous store's saved graph (loaded when first needed) when it still makes the same vectors,
    else the backbone, built (TensorFlow readied first: ``ready``).

    On OpenVINO the graph is traced in float32 (OpenVINO cannot compile a bfloat16 Keras graph) and OpenVINO
    computes it in the recipe's precision; the store still names that precision."""
    traced = "float32" if engine == "openvino" else recipe.precision
    if _graph_holds(old, options, traced):
        described = {k: old.meta[k] for k in DESCRIBED}
        return _Extractor(
            old.meta["key"],
            described,
            options["input_size"],
            old.meta[EXTRACTOR],
            load=lambda: _saved_graph(old),
            traced=traced,
        )
    ready()
    return _built(recipe, options, traced)


def _save_graph(root: Path, ex: _Extractor) -> dict | None:
    """Write the traced feature graph into the store; its meta.json entry, or None if it reads variables."""
    traced = graph.graph_bytes(ex.infer)
    if traced is None:
        return None
    data, input_name, output_name = traced
    return {
        "file": features.write_extractor(root, data),
        "input": input_name,
        "output": output_name,
        "any_batch": True,
        "traced": ex.traced,
        "weights_file": ex.backbone.weights_file,
        "weights_stat": _weights_stat(ex.backbone.weights_file),
    }


def _files(plan: _Plan, shard: tuple[int, int] | None, cache: features.Reusable) -> _Found:
    """This extract's files (one shard's only), hashed unless their size and mtime show the stored hash holds
    (size and mtime as the folder's scan read them)."""
    paths, labels = plan.ds.files, plan.ds.labels
    stats = plan.ds.stats or [None] * len(paths)
    if shard is not None:
        mine = [i for i, rel in enumerate(paths) if shards.index_of(rel, shard[1]) == shard[0]]
        paths, labels, stats = [paths[i] for i in mine], [labels[i] for i in mine], [stats[i] for i in mine]
    root = os.fspath(plan.ds.root)
    errors: dict[int, str] = {}
    stats = list(stats)
    for i in [i for i, seen in enumerate(stats) if seen is None]:
        try:
            st = os.stat(os.path.join(root, paths[i]))
            stats[i] = st.st_size, st.st_mtime_ns
        except OSError as exc:
            errors[i], stats[i] = f"unreadable: {exc.strerror}", (0, 0)
    table = np.array(stats, np.int64).reshape(len(paths), 2)
    sizes, mtimes = table[:, 0].copy(), table[:, 1].copy()
    hashes = cache.hashes(paths, sizes, mtimes)
    hashes[list(errors)] = ""
    known = hashes != ""
    for i in np.flatnonzero(~known).tolist():
        if i in errors:
            continue
        try:
            hashes[i] = files.content_hash(os.path.join(root, paths[i]))
        except OSError as exc:
            errors[i] = f"unreadable: {exc.strerror}"
    return _Found(paths, np.asarray(labels, np.int64), hashes, sizes, mtimes, errors, known)


def _stored_openvino(ex: _Extractor, store: Path, precision: str) -> Callable | None:
    """The store's OpenVINO conversion of the feature graph compiled to compute in ``precision``, when one of this
    OpenVINO version is there (then the run needs no TensorFlow at all); else None."""
    saved = ex.saved.get(features.OPENVINO) if ex.saved else None
    if not saved or saved.get("version") != engines.version():
        return None
    try:
        return engines.load((store / saved["file"]).read_bytes(), precision)
    except Exception:  # a damaged or foreign cache file is converted again, never an error
        return None


def _traced(ex: _Extractor, recipe: ExtractRecipe) -> None:
    """Give ``ex`` its TensorFlow feature graph: the store's saved one, else the backbone's, built and traced."""
    if ex.infer is None and ex.load is not None:
        ex.infer = ex.load()
        if ex.infer is None:
            ex.backbone, ex.saved = _built(recipe, _options(recipe), ex.traced).backbone, None
    if ex.infer is None:
        from tlcli.models.portable import features_model

        model = features_model(ex.backbone, len(images.views(recipe.resize)), recipe.flip_average)
        ex.infer = graph.inference_function(model, images.pixel_shape(ex.size, recipe.resize))


def _engine_function(
    ex: _Extractor, recipe: ExtractRecipe, store: Path, engine: str, ready: Callable[[], None]
) -> tuple[Callable, bytes | None]:
    """The feature function on ``engine``, and a new OpenVINO conversion to save beside the graph once the vectors
    are made (None if none was made). OpenVINO reuses the store's conversion; else TensorFlow is readied
    (``ready``: the device chosen) and the graph traced, then converted (from the graph traced in this run, which
    converts faster, or the saved one)."""
    if engine == "openvino":
        stored = _stored_openvino(ex, store, recipe.precision)
        if stored is not None:
            return stored, None
    ready()
    _traced(ex, recipe)
    if engine != "openvino":
        return ex.infer, None
    data = engines.convert(ex.infer if ex.backbone is not None else (store / ex.saved["file"]).read_bytes())
    return engines.load(data, recipe.precision), data


def _new_vectors(
    ex: _Extractor,
    todo: dict[str, str],
    recipe: ExtractRecipe,
    *,
    data: Path,
    store: Path,
    progress: Progress | None,
    engine: str,
    ready: Callable[[], None],
    spill: Spill,
) -> dict[str, str]:
    """Run the backbone over ``todo`` (paths by content hash) on ``engine`` (tracing it on first use, then saving
    its graph in the store), each batch's vectors into ``spill`` by content hash as they come; why the files that
    did not decode failed."""
    run, converted = _engine_function(ex, recipe, store, engine, ready)
    bad: dict[str, str] = {}
    done = 0
    digests = list(todo)
    paths = [str(data / rel) for rel in todo.values()]
    for outputs, ok, why in graph.graph_batches(run, paths, ex.size, recipe.resize, recipe.batch_size, progress):
        batch = digests[done : done + len(outputs)]
        spill.add([d for d, good in zip(batch, ok, strict=True) if good], outputs[ok])
        bad.update((d, reason) for d, good, reason in zip(batch, ok, why, strict=True) if not good)
        done += len(outputs)
    if ex.saved is None:  # written once the vectors are made, so an interrupted first run leaves no file
        ex.saved = _save_graph(store, ex)
    if converted is not None and ex.saved:
        written = features.write_extractor(store, converted, ".openvino.npz")
        ex.saved[features.OPENVINO] = {"file": written, "version": engines.version()}
    return bad


def _todo(found: _Found, cache: features.Reusable) -> list[int]:
    """The files whose vectors are neither stored nor known not to decode."""
    vectors = cache.vectors
    return [
        i
        for i, digest in zip(np.flatnonzero(~found.known).tolist(), found.hashes[~found.known].tolist(), strict=True)
        if i not in found.errors and digest not in vectors and digest not in cache.bad
    ]


def _rows(
    found: _Found, plan: _Plan, stored: Mapping, fresh: Mapping, bad: dict[str, str]
) -> tuple[features.Rows, list[dict]]:
    """The stored rows of the files whose hash the ``stored`` or ``fresh`` vectors hold (rows without their
    vectors, which ``features.write`` looks up for the rows it appends), and the skipped ones with why."""
    keep = found.known.copy()
    check = ~found.known
    if bad:
        check |= np.isin(found.hashes, list(bad))
    skipped = []
    for i in np.flatnonzero(check).tolist():
        digest = str(found.hashes[i])
        reason = found.errors.get(i) or bad.get(digest)
        keep[i] = reason is None and (digest in fresh or digest in stored)
        if not keep[i]:
            skipped.append({"path": found.paths[i], "reason": reason or "not decoded", "hash": digest or None})
    paths = np.array(found.paths, dtype=object)
    splits = np.array([plan.assignment[rel] for rel in found.paths], dtype=object)
    rows = features.Rows(paths, found.labels, splits, found.hashes, found.sizes, found.mtimes)
    return rows.take(keep), skipped


def _meta(ex: _Extractor, recipe: ExtractRecipe, plan: _Plan, shard: tuple[int, int] | None, skipped: list) -> dict:
    """What the store's meta.json records (its splits are filled in as they are written)."""
    return {
        "format": features.STORE_FORMAT,
        "key": ex.key,
        **ex.described,
        "input_size_source": _input_size(recipe)[1],
        "resize": recipe.resize,
        "flip_average": recipe.flip_average,
        "data_dir": str(plan.ds.root.resolve()),
        "classes": plan.ds.classes,
        "split_source": plan.source,
        "split_fractions": list(recipe.fractions),
        "seed": recipe.seed,
        "split_hash": plan.manifest,
        "shards": shard[1] if shard else 1,
        "splits": {},
        "skipped": skipped,
        "empty_classes": plan.ds.empty_classes,
        "versions": runs.versions(),
        "written": runs.timestamp(),
        **({EXTRACTOR: ex.saved} if ex.saved else {}),
        **({"shard": shard[0]} if shard else {}),
    }


def _summary(root: Path, meta: dict, plan: _Plan, rows: features.Rows, *, how: dict, counts: tuple, started) -> dict:
    """What extract and merge report: counts per split, images extracted, reused and skipped, seconds.

    ``counts`` is (images extracted, images reused, the key of the features the store held before if replaced).
    """
    extracted, reused, replaced = counts
    return {
        "out": str(root),
        "key": meta["key"],
        "backbone": meta["backbone"],
        "precision": meta.get("precision", "float32"),
        **how,
        "images": len(rows) + len(meta["skipped"]),
        "stored": len(rows),
        "extracted": extracted,
        "reused": reused,
        "skipped": meta["skipped"],
        "replaced_key": replaced,
        "splits": {k: v["n"] for k, v in meta["splits"].items()},
        "classes": plan.ds.classes,
        "empty_classes": plan.ds.empty_classes,
        "split_source": plan.source,
        "seconds": round(time.perf_counter() - started, 3),
    }


def extract(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    recipe: ExtractRecipe = EXTRACT,
    *,
    shard: tuple[int, int] | None = None,
    progress: Progress | None = None,
    wait: bool = False,
    engine: str = "keras",
    before_tensorflow: Callable[[], object] | None = None,
) -> dict:
    """Extract features for every image under ``data_dir`` into the store at ``out``, reusing unchanged ones.

    With ``shard=(i, n)`` only the files of shard i go through the backbone, into their own part
    ``out/shards/i-of-n`` (own lock, so n workers can share one ``out``); the split is still
    computed from the whole folder, so every part agrees with the others and with an unsharded run.
    ``engine`` runs the backbone (``engines.resolve``). Returns a summary: counts per split, how many images
    were extracted or reused, skipped files. ``before_tensorflow`` is called once before TensorFlow is first used
    (the CLI chooses the device there): a re-run whose new photos run on the store's OpenVINO conversion, or with
    none new, never imports TensorFlow.
    """
    started = time.perf_counter()
    images.views(recipe.resize)
    ready = functools.cache(before_tensorflow or (lambda: None))
    if devices.gpu_possible():
        ready()
    engine = engines.resolve(engine, backbones.check_precision(recipe.precision), cached=True)
    plan = _plan(data_dir, recipe.fractions, recipe.seed)
    options = _options(recipe)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the feature store")
    root = out if shard is None else shards.part_dir(out, *shard)
    with contextlib.ExitStack() as held:
        held.enter_context(locks.lock(root / locks.LOCK_NAME, f"extract is writing {root}", wait=wait))
        files.remove_leftovers(root)
        old = features.open_previous(root)
        ex = _extractor(old, recipe, options, engine, ready)
        cache = features.reusable(old, ex.key)
        if shard is not None:
            cache = cache.over(features.reusable(features.open_previous(out), ex.key))
        found = _files(plan, shard, cache)
        todo = _todo(found, cache)
        fresh: Mapping[str, np.ndarray] = {}
        bad = {}
        if todo:
            fresh = held.enter_context(contextlib.closing(Spill(root, ex.described["feature_dim"])))
            bad = _new_vectors(
                ex,
                {str(found.hashes[i]): found.paths[i] for i in todo},
                recipe,
                data=plan.ds.root,
                store=root,
                progress=progress,
                engine=engine,
                ready=ready,
                spill=fresh,
            )
        rows, skipped = _rows(found, plan, cache.vectors, fresh, {**cache.bad, **bad})
        if skipped and not rows and shard is None:
            first = skipped[0]
            raise UsageError(
                f"no images in {data_dir}: none of its {len(skipped)} image files decodes (e.g. {first['path']}: "
                f"{first['reason']}); no features were stored"
            )
        meta = _meta(ex, recipe, plan, shard, skipped)
        features.write(root, rows, plan.ds.classes, meta, old, ChainMap(fresh, cache.vectors))
        how = {"shard": shards.label(*shard) if shard else None, "engine": engine}
        reused = len(rows) - sum(1 for i in todo if str(found.hashes[i]) in fresh)
        return _summary(root, meta, plan, rows, how=how, counts=(len(fresh), reused, cache.replaced), started=started)


def _flag(name: str) -> str:
    return option(ExtractRecipe, name)


def _shard_command(meta: dict, data_dir: str | os.PathLike, out: Path, index: int, count: int) -> str:
    """The extract command that (re)builds one part, with the options another part was made with."""
    opts = [_flag("backbone"), meta["backbone"]]
    if meta.get("alpha") is not None and backbones.spec(meta["backbone"]).alphas:
        opts += [_flag("alpha"), f"{meta['alpha']:g}"]
    opts += [_flag("size"), str(meta["input_size"]), _flag("resize"), meta["resize"]]
    if meta["weights"] != EXTRACT.weights:
        opts += [_flag("weights"), meta["weights"]]
    if meta.get("flip_average"):
        opts.append(_flag("flip_average"))
    if meta.get("precision", EXTRACT.precision) != EXTRACT.precision:
        opts += [_flag("precision"), meta["precision"]]
    if tuple(meta["split_fractions"]) != EXTRACT.fractions:
        opts += [_flag("fractions"), ",".join(f"{f:g}" for f in meta["split_fractions"])]
    if meta["seed"]:
        opts += [_flag("seed"), str(meta["seed"])]
    opts += ["--shard", shards.label(index, count)]
    return shlex.join(["tlcli", "extract", str(data_dir), "--out", str(out), *opts])


def _shard_count(data_dir: str | os.PathLike, out: Path) -> int:
    """The N of the ``extract --shard I/N`` parts under ``out``; usage error for none or two counts."""
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
    return found[0]


def _check_complete(parts: dict[int, Store], count: int, where: Path, rerun: Callable[[int], str]) -> None:
    """Refuse a merge while some part is missing, with the command that makes it."""
    missing = [i for i in range(1, count + 1) if i not in parts]
    if missing:
        names = ", ".join(shards.label(i, count) for i in missing)
        others = ", ".join(shards.label(i, count) for i in missing[1:])
        raise UsageError(
            f"shard{'s' if others else ''} {names} missing in {where}; run '{rerun(missing[0])}'"
            + (f" (and likewise --shard {others})" if others else "")
            + ", then merge again"
        )


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
            ("split_fractions", _flag("fractions")),
            ("seed", _flag("seed")),
        ):
            if meta.get(field) != ref.get(field):
                raise UsageError(
                    f"shard {i}/{count} has {what} {meta.get(field)} but shard {first}/{count} has "
                    f"{ref.get(field)}; re-run the wrong one with the others' options, e.g. '{rerun(i)}'"
                )


def _as_recorded(name: str, value: Any) -> Any:
    """A recipe field's value as meta.json records it."""
    if name == "backbone":
        return backbones.spec(value).name
    if name == "weights":
        return backbones.weights_label(value)
    if name == "precision":
        return backbones.check_precision(value)
    return list(value) if name == "fractions" else value


def _check_given(ref: dict, given: Mapping[str, Any], where: Path) -> None:
    """Refuse options given to a merge that differ from those the parts were made with."""
    for name in _MERGE_CHECKED:
        if given.get(name) is None:
            continue
        value = _as_recorded(name, given[name])
        have = ref.get(_META_KEY.get(name, name), EXTRACT.precision if name == "precision" else None)
        if value != have:
            raise UsageError(
                f"the parts in {where} were made with {_flag(name)} {have}, not {value}; "
                "merge without that option, or re-run every shard with it"
            )


def _check_folder(
    data_dir: str | os.PathLike, plan: _Plan, parts: dict[int, Store], count: int, rerun: Callable[[int], str]
) -> None:
    """Refuse parts made from another data folder, or before files were added, removed or renamed."""
    ref = parts[min(parts)].meta
    if str(plan.ds.root.resolve()) != ref["data_dir"]:
        raise UsageError(
            f"the parts were extracted from {ref['data_dir']}, not {plan.ds.root.resolve()}; give that DATA_DIR"
        )
    stale = [i for i, part in parts.items() if part.meta["split_hash"] != plan.manifest]
    if stale:
        names = ", ".join(shards.label(i, count) for i in stale)
        raise UsageError(
            f"files in {data_dir} were added, removed or renamed since shard {names} ran; re-run "
            f"{'every shard' if len(stale) == count else 'those'} (only new files are extracted), "
            f"e.g. '{rerun(stale[0])}', then merge again"
        )


def _joined(
    parts: dict[int, Store], plan: _Plan, count: int, rerun: Callable[[int], str]
) -> tuple[features.Rows, list[dict]]:
    """Every part's rows and skipped files, in the order an unsharded extract stores them."""
    order = {rel: k for k, rel in enumerate(plan.ds.files)}
    rows: list[features.Rows] = []
    skipped: list[dict] = []
    for i, part in parts.items():
        try:
            part_rows = part.rows()
        except UsageError:
            raise UsageError(f"shard {i}/{count} in {part.root} is unreadable; re-run '{rerun(i)}'") from None
        listed = set(part_rows.paths.tolist()) | {s["path"] for s in part.meta.get("skipped", [])}
        if listed != {rel for rel in plan.ds.files if shards.index_of(rel, count) == i}:
            raise UsageError(f"shard {i}/{count} in {part.root} does not hold its shard's files; re-run '{rerun(i)}'")
        rows.append(part_rows)
        skipped += part.meta.get("skipped", [])
    joined = features.Rows.joined(rows)
    skipped.sort(key=lambda s: order[s["path"]])
    return joined.take(np.argsort([order[p] for p in joined.paths.tolist()], kind="stable")), skipped


def merge_shards(
    data_dir: str | os.PathLike, out: str | os.PathLike, given: Mapping[str, Any] | None = None, *, wait: bool = False
) -> dict:
    """Join the parts ``extract --shard i/n`` wrote under ``out/shards`` into the store at ``out``.

    The result is the store an unsharded extract of the same folder writes: same files in the same
    order, same splits and meta.json keys, file stats kept so later runs stay incremental. The
    options come from the parts; ``given`` (ExtractRecipe field names) must match them. Missing
    parts, parts made with other options or from another state of the folder are refused with
    the command that rebuilds them.
    """
    started = time.perf_counter()
    out = Path(out)
    count = _shard_count(data_dir, out)
    with contextlib.ExitStack() as held:
        held.enter_context(locks.lock(out / locks.LOCK_NAME, f"extract is writing {out}", wait=wait))
        files.remove_leftovers(out)
        parts = features.open_parts(out, count, wait=wait, held=held)
        first = parts[min(parts)]

        def rerun(i: int) -> str:
            return _shard_command(first.meta, data_dir, out, i, count)

        _check_complete(parts, count, out / shards.SHARDS_DIR, rerun)
        _check_parts(parts, count, rerun)
        _check_given(first.meta, given or {}, out / shards.SHARDS_DIR)
        plan = _plan(data_dir, first.meta["split_fractions"], first.meta["seed"])
        _check_folder(data_dir, plan, parts, count, rerun)
        rows, skipped = _joined(parts, plan, count, rerun)
        replaced = features.reusable(features.open_previous(out), first.meta["key"]).replaced
        meta = {k: v for k, v in first.meta.items() if k not in ("shard", EXTRACTOR)}
        meta.update(splits={}, skipped=skipped, written=runs.timestamp())
        carried = features.carry_extractor(first, out)
        if carried:
            meta[EXTRACTOR] = carried
        features.write(out, rows, plan.ds.classes, meta, features.open_previous(out))
        counts = (0, len(rows), replaced)
        return _summary(out, meta, plan, rows, how={"merged": count}, counts=counts, started=started)
