"""Hard edges of folders, archives and the console: link loops, undecodable names, folders without images,
zip bombs, hard links in tars, a reader that stops early, a foreign KERAS_BACKEND, TensorFlow's C++ logs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tlcli.data import datasets
from tlcli.data.fetch import unpack
from tlcli.data.fetch.dataset import fetch
from tlcli.data.fetch.request import FetchRequest
from tlcli.data.fetch.unpack import extract_archive
from tlcli.errors import UsageError

from .conftest import COLOUR_EXTRACT, ROOT, make_photo

TLCLI = [sys.executable, "-m", "tlcli"]


def _two_classes(root: Path, n: int = 3) -> Path:
    for i in range(n):
        make_photo(root / "cat" / f"c{i}.jpg", (200, 40, 40), size=(16, 16), seed=i)
        make_photo(root / "dog" / f"d{i}.jpg", (40, 40, 200), size=(16, 16), seed=50 + i)
    return root


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.stderr
    return result.stderr


def test_a_folder_link_that_loops_is_refused_and_every_real_file_is_listed_once(cli, tmp_path):
    """`cat/loop -> .` once made extract store 12 photos as 492 entries 40 levels deep (train and test
    sharing photos) and fetch-data print a 700-character Python list; now both exit 2 with one line.
    Links that do not loop are followed once: a class linked into another, a second name for a class
    folder, a file linked beside itself each add no second copy."""
    data = _two_classes(tmp_path / "data")
    (data / "cat" / "loop").symlink_to(".")
    with pytest.raises(UsageError, match="links back to"):
        datasets.scan(data)
    assert "links back to" in _one_line_error(cli("extract", data, "--out", tmp_path / "f", "--quiet"))
    fetched = cli("fetch-data", data, "--name", "looped", "--data-dir", tmp_path / "fetched", "--quiet")
    assert "links back to" in _one_line_error(fetched)
    assert not (tmp_path / "fetched" / "looped").exists()

    (data / "cat" / "loop").unlink()
    (data / "cat" / "dogs").symlink_to("../dog")
    (data / "cat" / "zz.jpg").symlink_to("c0.jpg")
    (data / "kitten").symlink_to("cat")
    ds = datasets.scan(data)
    assert ds.classes == ["cat", "dog"] and ds.empty_classes == ["kitten"]
    assert ds.files == [f"cat/c{i}.jpg" for i in range(3)] + [f"dog/d{i}.jpg" for i in range(3)]


def test_a_name_with_invalid_utf8_bytes_is_fetched_split_and_extracted(cli, tmp_path, keras_home):
    """A file name with a byte that is not UTF-8 once made extract and fetch-data fail with 'unexpected
    UnicodeEncodeError' (the split's seeded hash encoded the name); the hash now takes the path's bytes.
    Two identical files that are not images each get their own reason (they once both got the last one's,
    which named the other file)."""
    data = _two_classes(tmp_path / "data")
    odd = os.fsdecode(b"odd\xff.jpg")
    (data / "cat" / odd).write_bytes((data / "cat" / "c1.jpg").read_bytes())
    for folder in ("cat", "dog"):
        (data / folder / "notes.jpg").write_text("not a photo\n")
    fetched = cli("fetch-data", data, "--name", "odd", "--data-dir", tmp_path / "fetched", "--json", "--quiet")
    assert fetched.exit_code == 0, fetched.output
    assert json.loads(fetched.stdout)["counts"] == {"cat": 4, "dog": 3}

    result = cli("extract", data, "--out", tmp_path / "f", *COLOUR_EXTRACT, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["stored"] == 7 and sum(summary["splits"].values()) == 7
    skipped = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert sorted(skipped) == ["cat/notes.jpg", "dog/notes.jpg"]
    assert all(reason == "cannot identify image file" for reason in skipped.values()), skipped


def test_a_folder_without_images_is_exit_2(cli, tmp_path, keras_home):
    """Files named .jpg/.png that are not images once gave exit 0 and an empty feature store."""
    data = tmp_path / "data"
    for rel in ("cat/a.jpg", "cat/b.jpg", "dog/c.jpg"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text("hello\n")
    (data / "dog" / "e.png").write_bytes(b"")
    result = cli("extract", data, "--out", tmp_path / "f", *COLOUR_EXTRACT)
    assert "no images in" in _one_line_error(result) and "cannot identify image file" in result.stderr
    assert not (tmp_path / "f" / "meta.json").exists()


def _zip(entries: dict[str, bytes], level: int = 1) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_bombs_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A zip holding 64 MiB of zeros in 64 kB (1000-fold) is refused from its directory, nothing unpacked;
    so is one whose total is past 100 times its size (here with the small-archive allowance lowered
    to 1 MB: 20 entries of 2 MB zeros, each under the per-entry check, from a ~40 kB archive). fetch-data
    on a full disk once said the bomb needed its compressed size of free space; now it refuses the bomb."""
    photo = make_photo(tmp_path / "p.jpg", (200, 40, 40), size=(16, 16)).read_bytes()
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(_zip({"pack/red/r.jpg": photo, "pack/red/zeros.jpg": bytes(64 << 20)}, level=9))
    with pytest.raises(UsageError, match=r"expands \d+-fold .*possible zip bomb"):
        extract_archive(bomb, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(total=10**9, used=10**9 - 10**6, free=10**6))
    with pytest.raises(UsageError, match="possible zip bomb"):  # on a full disk, too: not a free-space error
        fetch(FetchRequest(str(bomb), name="bomb"), data_dir=tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) in ([], ["bomb.lock"])

    monkeypatch.setattr(unpack, "SMALL_ARCHIVE_ALLOWANCE", 10**6)
    many = tmp_path / "many.zip"
    many.write_bytes(
        _zip({"pack/red/r.jpg": photo, **{f"pack/blue/{i}.bmp": bytes(2 << 20) for i in range(20)}}, level=9)
    )
    assert many.stat().st_size < 100_000
    with pytest.raises(UsageError, match="declares 41.9 MB of files.*possible zip bomb"):
        extract_archive(many, tmp_path / "out2")
    assert list((tmp_path / "out2").iterdir()) == []


def test_a_hard_link_inside_a_tar_is_kept_as_a_copy(tmp_path):
    """A hard link between two images of a tar was once silently missing; one to a member not unpacked
    before it is refused with a reason."""
    photo = make_photo(tmp_path / "p.jpg", (200, 40, 40), size=(16, 16)).read_bytes()

    def tar(link_to: str) -> Path:
        path = tmp_path / f"{link_to.replace('/', '-')}.tar"
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo("pack/red/a.jpg")
            info.size = len(photo)
            tf.addfile(info, io.BytesIO(photo))
            link = tarfile.TarInfo("pack/blue/b.jpg")
            link.type, link.linkname = tarfile.LNKTYPE, link_to
            tf.addfile(link)
        return path

    out = tmp_path / "out"
    assert extract_archive(tar("pack/red/a.jpg"), out) == {"files": 2, "bytes": 2 * len(photo)}
    copy = out / "pack" / "blue" / "b.jpg"
    assert copy.read_bytes() == photo and copy.stat().st_nlink == 1
    with pytest.raises(UsageError, match="hard link to 'pack/red/none.jpg', which is not a file unpacked before it"):
        extract_archive(tar("pack/red/none.jpg"), tmp_path / "out2")


def test_predict_batches_come_one_batch_at_a_time(colour_run):
    """predict --json once printed every line at the end; the library now hands over each batch as scored."""
    from tlcli.train import predict

    batches = predict.predict_batches(colour_run.latest, [str(colour_run.data)], batch_size=5)
    rows, skipped = next(batches)
    assert len(rows) == 5 and not skipped and rows[0]["path"].endswith("b0.jpg")
    assert sum(len(rows) for rows, _ in batches) == 24 - 5


def test_predict_into_a_closed_pipe_exits_quietly_on_tensorflow_without_its_logs(colour_run, tmp_path):
    """`KERAS_BACKEND=jax tlcli predict RUN DIR --json | head -1` once said 'unexpected ModuleNotFoundError'
    (a typo in it: a 56-line traceback), and with the backend right 'error: Broken pipe', exit 1; and
    TensorFlow's C++ lines (absl ones such as 'E0000 ... NodeDef mentions attribute use_unbounded_threadpool'
    ignore TF_CPP_MIN_LOG_LEVEL) reached stderr under --quiet, forced here with grappler's verbose log (26
    lines before). Now: exit 0 and nothing on stderr when stdout's reader is gone before the first line."""
    (tmp_path / "notes.jpg").write_text("not a photo\n")
    env = {"KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "meta_optimizer=1"}
    args = ["predict", colour_run.latest, colour_run.data, tmp_path / "notes.jpg", "--json", "--quiet"]
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [*TLCLI, *map(str, args)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env},
            timeout=300,
        )
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
