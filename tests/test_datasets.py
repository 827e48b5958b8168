"""Class-folder scanning and the deterministic, stratified split."""

from __future__ import annotations

import json

import pytest

from tlcli.data import datasets
from tlcli.errors import UsageError

from .conftest import make_photo


def _tree(root, counts):
    for cls, n in counts.items():
        for i in range(n):
            make_photo(root / cls / f"{cls}_{i}.jpg", (i * 9 % 255, 80, 80), size=(8, 8), seed=i)
    return root


def test_scan_lists_classes_in_order_and_ignores_non_images(tmp_path):
    root = _tree(tmp_path / "d", {"dog": 3, "cat": 2})
    (root / "cat" / "Thumbs.db").write_bytes(b"x")
    (root / "cat" / ".hidden.jpg").write_bytes(b"x")
    (root / "empty").mkdir()
    ds = datasets.scan(root)
    assert ds.classes == ["cat", "dog"]
    assert ds.files[:2] == ["cat/cat_0.jpg", "cat/cat_1.jpg"]
    assert ds.labels == [0, 0, 1, 1, 1]
    assert ds.empty_classes == ["empty"]


@pytest.mark.parametrize(
    "layout,message",
    [({}, "no class sub-folders"), ({"cat": 3}, "only one class")],
)
def test_scan_needs_two_classes(tmp_path, layout, message):
    root = _tree(tmp_path / "d", layout)
    root.mkdir(exist_ok=True)
    with pytest.raises(UsageError, match=message):
        datasets.scan(root)


def test_scan_missing_folder(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        datasets.scan(tmp_path / "nope")


def test_split_is_stratified_seeded_and_stable(tmp_path):
    root = _tree(tmp_path / "d", {"a": 40, "b": 20})
    ds = datasets.scan(root)
    first, source = datasets.assign_splits(ds, (0.8, 0.1, 0.1), seed=3)
    again, _ = datasets.assign_splits(datasets.scan(root), (0.8, 0.1, 0.1), seed=3)
    other, _ = datasets.assign_splits(ds, (0.8, 0.1, 0.1), seed=4)
    assert source == "stratified" and first == again and first != other
    for cls, n in (("a", 40), ("b", 20)):
        got = [first[f] for f in ds.files if f.startswith(cls)]
        assert got.count("test") == round(n * 0.1) and got.count("val") == round(n * 0.1)
    make_photo(root / "a" / "new.jpg", (1, 2, 3), size=(8, 8))
    grown, _ = datasets.assign_splits(datasets.scan(root), (0.8, 0.1, 0.1), seed=3)
    moved = sum(grown[f] != first[f] for f in first)
    assert moved <= 2


def test_split_json_wins(tmp_path):
    root = _tree(tmp_path / "d", {"a": 4, "b": 4})
    (root / "split.json").write_text(json.dumps({"train": ["a/a_0.jpg"], "val": [], "test": ["b/b_0.jpg"]}))
    assignment, source = datasets.assign_splits(datasets.scan(root))
    assert assignment["a/a_0.jpg"] == "train" and assignment["b/b_0.jpg"] == "test"
    assert source == "split.json+stratified"


@pytest.mark.parametrize("text", ["0.8,0.1", "0.5,0.5,0.5", "a,b,c", "0,0.5,0.5"])
def test_bad_split_fractions(text):
    with pytest.raises(UsageError, match="--split"):
        datasets.parse_fractions(text)
