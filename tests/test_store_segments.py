"""The segmented feature store: a run writes only what changed, reads are memory-mapped, removals compact."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tlcli.errors import UsageError
from tlcli.store import features
from tlcli.store.features import Rows, Store

from .conftest import COLOUR_EXTRACT, make_photo

DIM = 64
CLASSES = ["a", "b"]


def _rows(ids, split="train") -> Rows:
    """Synthetic rows whose vector, label and hash follow from the id, so a re-read can be checked."""
    ids = np.asarray(list(ids), np.int64)
    return Rows(
        np.asarray([f"c/{i}.jpg" for i in ids]),
        ids % 2,
        np.full(len(ids), split),
        np.asarray([f"{i:032x}" for i in ids]),
        100 + ids,
        7 + ids,
        np.full((len(ids), DIM), ids[:, None], np.float32) + np.arange(DIM),
    )


def _commit(root: Path, rows: Rows, vectors=None) -> Store:
    meta = {
        "format": features.STORE_FORMAT,
        "key": "k",
        "backbone": "b",
        "input_size": 32,
        "resize": "crop",
        "feature_dim": DIM,
        "data_dir": "/d",
        "classes": CLASSES,
        "split_hash": "h",
        "splits": {},
        "written": "now",
    }
    features.write(root, rows, CLASSES, meta, features.open_previous(root), vectors)
    return Store.open(root)


def _files(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in root.iterdir()}


def _check(store: Store, ids) -> None:
    """The store holds exactly the rows of ``ids``, with their vectors."""
    got = {p: v for s in features.SPLITS for p, v in zip(store.split(s).paths, store.split(s).features, strict=True)}
    assert sorted(got) == sorted(f"c/{i}.jpg" for i in ids)
    for i in ids:
        np.testing.assert_array_equal(got[f"c/{i}.jpg"], np.full(DIM, i, np.float32) + np.arange(DIM))


def test_an_incremental_write_adds_only_the_new_rows_and_an_unchanged_one_writes_nothing(tmp_path):
    root = tmp_path / "s"
    _commit(root, _rows(range(1000)))
    full = _files(root)
    meta_stat = (root / "meta.json").stat()
    _commit(root, _rows(range(1000)))
    assert _files(root) == full
    assert (root / "meta.json").stat().st_mtime_ns == meta_stat.st_mtime_ns  # not even meta.json rewritten

    store = _commit(root, _rows(range(1010)))
    created = {n: size for n, size in _files(root).items() if n not in full}
    assert sorted(n.rsplit(".", 1)[1] for n in created) == ["npy", "npz"]  # one new segment
    assert sum(created.values()) < 10 * DIM * 4 + 4000 < 0.1 * sum(full.values())
    assert len(store.segments("train")) == 2 and store.meta["splits"]["train"]["n"] == 1010
    _check(store, range(1010))


def test_removals_are_dropped_in_meta_then_compacted_past_the_fraction(tmp_path):
    root = tmp_path / "s"
    first = _commit(root, _rows(range(100))).segments("train")[0]
    store = _commit(root, _rows(range(10, 100)))
    assert store.segments("train") == [{**first, "dropped": list(range(10))}]  # no file written for a removal
    _check(store, range(10, 100))
    store = _commit(root, _rows(range(30, 100)))
    (segment,) = store.segments("train")
    assert segment["n"] == 70 and segment["dropped"] == [] and first["file"] not in _files(root)
    _check(store, range(30, 100))


def test_a_changed_file_and_a_split_move_replace_their_rows(tmp_path):
    root = tmp_path / "s"
    _commit(root, _rows(range(20)))
    moved = Rows.joined([_rows(range(19)), _rows([19], split="val")])
    moved.hashes[5] = "f" * 32
    store = _commit(root, moved)
    assert [len(s["dropped"]) for s in store.segments("train")] == [2, 0]
    assert store.split("val").paths == ["c/19.jpg"] and store.arrays("train")["hashes"][-1] == "f" * 32
    _check(store, range(20))


def test_many_runs_merge_all_but_the_largest_segment(tmp_path):
    root = tmp_path / "s"
    for n in range(100, 100 + features.MAX_SEGMENTS + 1):
        store = _commit(root, _rows(range(n + 1)))
    assert len(store.segments("train")) == 2 and [s["n"] for s in store.segments("train")] == [101, 16]
    _check(store, range(100 + features.MAX_SEGMENTS + 1))


def test_reads_are_memory_mapped_and_a_truncated_segment_is_a_one_line_error(tmp_path):
    root = tmp_path / "s"
    _commit(root, _rows(range(50)))
    one = Store.open(root).split("train").features
    assert isinstance(one, np.memmap) and not one.flags.writeable
    store = _commit(root, _rows(range(60)))
    np.testing.assert_array_equal(store.split("train").features[:50], one)
    vectors = root / store.segments("train")[1]["vectors"]
    vectors.write_bytes(vectors.read_bytes()[:-DIM])
    with pytest.raises(UsageError, match=f"{vectors} is unreadable.*re-run 'tlcli extract'"):
        store.split("train")
    _check(_commit(root, _rows(range(60))), range(60))  # the damaged segment's rows are written again


def test_extract_appends_only_the_new_photo_and_the_rows_it_moves(cli, keras_home, colour_dataset, tmp_path):
    """A photo added to a class can push a neighbour across a stratified cut: those rows move, and the 2-row val
    and test splits, past the dropped fraction, are compacted whole; the 20-row train segment stays as it is."""
    out = tmp_path / "f"

    def extract():
        result = cli("extract", colour_dataset, "--out", out, *COLOUR_EXTRACT, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    extract()
    before = _files(out)
    (train,) = Store.open(out).segments("train")
    assert extract()["extracted"] == 0 and _files(out) == before
    make_photo(colour_dataset / "red" / "new.jpg", (210, 30, 30), seed=5)
    assert extract()["extracted"] == 1
    store = Store.open(out)
    assert store.segments("train")[0]["file"] == train["file"] and train["file"] in _files(out)
    created = [seg for s in features.SPLITS for seg in store.segments(s) if seg["file"] not in before]
    assert 1 <= sum(seg["n"] for seg in created) <= 1 + 2 + 3
    assert sum(_files(out)[n] for seg in created for n in (seg["file"], seg["vectors"])) < 6 * 4000


def test_a_format_2_store_is_refused_in_one_line_and_replaced_whole_by_the_next_write(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    old = {"format": 2, "key": "k", "splits": {"train": {"n": 3, "file": "train-0123456789abcdef.npz"}}}
    (root / "meta.json").write_text(json.dumps(old))
    np.savez(root / "train-0123456789abcdef.npz", features=np.zeros((3, DIM), np.float32))
    with pytest.raises(UsageError, match="another tlcli version; re-run 'tlcli extract'"):
        Store.open(root)
    assert features.open_previous(root) is None  # so extract extracts every photo again
    _check(_commit(root, _rows(range(5))), range(5))
    assert "train-0123456789abcdef.npz" not in _files(root)


def test_new_vectors_go_through_a_scratch_file_into_segments_written_a_chunk_at_a_time(tmp_path, monkeypatch):
    """A full extract of a million photos would hold gigabytes of vectors: each batch goes to an unlinked scratch
    file (nothing left in the folder, even after a kill) and segments are written from it in chunks, under the same
    content-addressed name and bytes as from one array."""
    from tlcli.store import segments
    from tlcli.store.spill import Spill

    rows = _rows(range(10))
    spill = Spill(tmp_path / "s", DIM)
    spill.add(rows.hashes[:6].tolist(), rows.vectors[:6])
    spill.add([], np.zeros((0, DIM), np.float32))
    spill.add(rows.hashes[6:].tolist(), rows.vectors[6:])
    assert list((tmp_path / "s").iterdir()) == [] and len(spill) == 10
    assert all(np.array_equal(spill[d], v) for d, v in zip(rows.hashes.tolist(), rows.vectors, strict=True))
    monkeypatch.setattr(features, "_WRITE_CHUNK", 3)
    chunked = _commit(tmp_path / "chunked", dataclasses.replace(rows, vectors=None), spill)
    spill.close()
    whole = _commit(tmp_path / "whole", rows)
    assert chunked.segments("train") == whole.segments("train")
    for name in segments.names(whole.segments("train")[0]):
        assert (tmp_path / "chunked" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_train_head_reads_the_splits_once_into_one_array_that_tensorflow_shares(tmp_path):
    """train-head holds the store's vectors once: train, val and test read into one aligned array, train+val
    joined as a view of it, and the tensors the head trains on share its memory instead of copying it."""
    from tlcli.store.features import Split
    from tlcli.train.head import as_tensor

    store = _commit(
        tmp_path / "s", Rows.joined([_rows(range(8)), _rows(range(8, 11), "val"), _rows(range(11, 13), "test")])
    )
    train, val, test = store.splits()
    assert [len(s.labels) for s in (train, val, test)] == [8, 3, 2]
    assert np.array_equal(val.features, store.split("val").features) and val.paths == store.split("val").paths
    both = Split.joined([train, val])
    assert np.shares_memory(both.features, train.features) and np.shares_memory(both.features, val.features)
    assert np.array_equal(both.features, np.concatenate([train.features, val.features]))
    tensor = as_tensor(both.features)
    train.features[0, 0] = -1.0
    assert float(tensor[0, 0]) == -1.0
    assert np.array_equal(Split.joined([val, train]).features, np.concatenate([val.features, train.features]))
