"""fetch-data against a loopback HTTP server: resumable verified downloads, safe unpacking, cleaning, layouts."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
import types
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlcli.data.fetch import download, registry, sizes
from tlcli.data.fetch.clean import clean
from tlcli.data.fetch.dataset import fetch
from tlcli.data.fetch.request import FetchRequest
from tlcli.errors import UsageError

from .conftest import ROOT, lock_held, make_photo

CAT, DOG = (210, 70, 40), (40, 70, 210)
MS_ZIP = "kagglecatsanddogs_5340.zip"
FAST = ("--backbone", "mobilenet", "--alpha", "0.25", "--size", "64", "--weights", "none", "--quiet")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _photo(tmp: Path, colour, seed: int, fmt: str = "JPEG") -> bytes:
    return make_photo(tmp / f"{seed}.{fmt.lower()}", colour, seed=seed, fmt=fmt).read_bytes()


def _zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def _tar(entries: dict[str, bytes], specials: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in specials:
            tf.addfile(info)
    return buf.getvalue()


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def _microsoft_zip(tmp: Path) -> bytes:
    """Laid out like kagglecatsanddogs_5340.zip, with the dirt the real one carries."""
    entries = {}
    for i in range(8):
        entries[f"PetImages/Cat/{i}.jpg"] = _photo(tmp, CAT, i)
        entries[f"PetImages/Dog/{i}.jpg"] = _photo(tmp, DOG, 100 + i)
    good = entries["PetImages/Cat/0.jpg"]
    entries["PetImages/Cat/666.jpg"] = good.replace(b"\xff\xc0", b"\xff\xc7", 1)
    entries["PetImages/Cat/9999.jpg"] = good[: len(good) // 3]
    entries["PetImages/Dog/11702.jpg"] = b""
    entries["PetImages/Dog/8888.jpg"] = _photo(tmp, DOG, 200, fmt="PNG")
    entries["PetImages/Cat/Thumbs.db"] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(120)
    entries["PetImages/Dog/Thumbs.db"] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(90)
    entries["CDLA-Permissive-2.0.pdf"] = b"%PDF-1.4\n%not really\n"
    entries["readme[1].txt"] = b"Cats and dogs.\n"
    return _zip(entries)


BREEDS = {"Abyssinian": (1, 1), "Bengal": (2, 1), "beagle": (3, 2), "pug": (4, 2)}


def _oxford(tmp: Path) -> tuple[bytes, bytes]:
    """images.tar.gz and annotations.tar.gz laid out like Oxford-IIIT Pet."""
    files, trainval, test = {}, [], []
    for b, (breed, (class_id, species)) in enumerate(BREEDS.items()):
        colour = CAT if species == 1 else DOG
        for n in range(1, 7):
            files[f"images/{breed}_{n}.jpg"] = _photo(tmp, colour, 300 + 10 * b + n)
            (trainval if n <= 4 else test).append(f"{breed}_{n} {class_id} {species} {class_id}")
    files["images/Bengal_6.jpg"] = _photo(tmp, CAT, 400, fmt="PNG")
    files["images/pug_6.jpg"] = _photo(tmp, DOG, 401, fmt="GIF")
    files["images/beagle_6.jpg"] = files["images/beagle_1.jpg"].replace(b"\xff\xc0", b"\xff\xc7", 1)
    files["images/Abyssinian_100.mat"] = b"MATLAB 5.0 MAT-file" + bytes(64)
    files["images/Abyssinian_7.jpg"] = _photo(tmp, CAT, 402)
    annotations = {
        "annotations/trainval.txt": ("\n".join(trainval) + "\n").encode(),
        "annotations/test.txt": ("\n".join(test) + "\n").encode(),
        "annotations/list.txt": b"#Image CLASS-ID SPECIES BREED ID\n" + "\n".join(trainval + test).encode(),
    }
    return _tar(files), _tar(annotations)


@pytest.fixture(scope="session")
def archives(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("photos")
    images_tar, annotations_tar = _oxford(tmp)
    return {MS_ZIP: _microsoft_zip(tmp), "images.tar.gz": images_tar, "annotations.tar.gz": annotations_tar}


def _handler(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        """GET /<mode>/<file>: range (honours Range), norange (ignores it), drop (cuts the first response
        half-way), norange-drop (both), flaky (503 first)."""

        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            mode, _, name = self.path.lstrip("/").partition("/")
            data = state.files.get(name)
            rng = self.headers.get("Range")
            state.requests.append({"mode": mode, "name": name, "range": rng})
            if data is None:
                self.send_error(404)
                return
            if mode == "flaky" and name not in state.failed:
                state.failed.add(name)
                self.send_error(503)
                return
            start = 0
            if rng and not mode.startswith("norange"):
                start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if mode.endswith("drop") and name not in state.dropped:
                state.dropped.add(name)
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                state.sent[name] += len(body) // 2
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)
            state.sent[name] += len(body)

    return Handler


@pytest.fixture()
def server(monkeypatch):
    """A loopback HTTP server on 127.0.0.1; put bytes in .files, read .requests and .sent."""
    monkeypatch.setattr(download, "RETRY_BACKOFF", 0.01)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    state = types.SimpleNamespace(files={}, requests=[], dropped=set(), failed=set(), sent=Counter())
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _register(monkeypatch, server, archives, mode: str = "range", **override) -> None:
    """Serve the test archives and point the registry at them (TLCLI_DATASET_MIRROR + their sizes/sha256)."""
    server.files.update(archives)
    monkeypatch.setenv(registry.MIRROR_ENV, f"{server.url}/{mode}")
    for name, known in list(registry.REGISTRY.items()):
        files = tuple(
            dataclasses.replace(
                r,
                size=override.get("size", len(archives[r.filename])),
                sha256=override.get("sha256", _sha(archives[r.filename])),
            )
            for r in known.files
        )
        monkeypatch.setitem(registry.REGISTRY, name, dataclasses.replace(known, files=files))


def _fetch(cli, *args):
    result = cli("fetch-data", *args, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _tree(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(root.iterdir()) if d.is_dir()}


def _no_leftovers(data: Path, name: str) -> None:
    assert not list(data.glob(f".{name}.*")), "staging folder left behind"
    assert not (data / f"{name}.lock").exists(), "lock left behind"
    assert not list(data.glob(".downloads/*.part")) and not list(data.glob(".downloads/*.lock"))


def test_list_shows_known_datasets_without_network(cli, server, monkeypatch):
    result = cli("fetch-data", "--list", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"cats-vs-dogs", "oxford-pets"}
    (ms,) = rows["cats-vs-dogs"]["files"]
    assert ms["bytes"] == 824887076 and ms["url"].endswith("/kagglecatsanddogs_5340.zip")
    assert ms["sha256"] == "b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9"
    images_tar, annotations_tar = rows["oxford-pets"]["files"]
    assert (images_tar["bytes"], annotations_tar["bytes"]) == (791918971, 19173078)
    assert images_tar["sha256"].startswith("67195c5e") and annotations_tar["sha256"].startswith("52425fb6")
    assert "CC BY-SA 4.0" in rows["oxford-pets"]["licence"] and rows["oxford-pets"]["homepage"].startswith("https://")
    monkeypatch.setenv(registry.MIRROR_ENV, "http://mirror.example/pets/")
    table = cli("fetch-data", "--list")
    assert table.exit_code == 0
    assert "824.9 MB" in table.stdout and "http://mirror.example/pets/images.tar.gz" in table.stdout
    assert server.requests == []
    missing = cli("fetch-data")
    assert missing.exit_code == 2 and "--list" in missing.stderr
    typo = cli("fetch-data", "cats-vs-dog")
    assert typo.exit_code == 2 and "did you mean cats-vs-dogs" in typo.stderr


def test_cut_off_download_resumes_then_cleans_and_splits(cli, server, monkeypatch, archives, tmp_path):
    _register(monkeypatch, server, archives, mode="drop")
    data = tmp_path / "data"
    s = _fetch(cli, "cats-vs-dogs", "--data-dir", data)
    size = len(archives[MS_ZIP])
    first, second = [r for r in server.requests if r["name"] == MS_ZIP]
    assert first["range"] is None and second["range"] == f"bytes={size // 2}-"
    assert server.sent[MS_ZIP] == size and s["resumed"] and s["downloaded_bytes"] == size
    cached = data / ".downloads" / MS_ZIP
    assert _sha(cached.read_bytes()) == _sha(archives[MS_ZIP])

    root = data / "cats-vs-dogs"
    assert _tree(root) == {
        "cat": [f"{i}.jpg" for i in range(8)],
        "dog": [f"{i}.jpg" for i in range(8)] + ["8888.png"],
    }
    assert Image.open(root / "dog" / "8888.png").format == "PNG"
    assert {p.name for p in root.iterdir() if p.is_file()} == {"split.json", "dataset.json", "cleaning.json"}
    assert s["classes"] == ["cat", "dog"] and s["counts"] == {"cat": 8, "dog": 9} and s["images"] == 17
    assert s["dropped"] == 5 and s["renamed"] == 1
    assert s["drop_reasons"] == {"corrupt": 1, "truncated": 1, "empty": 1, "not an image": 2}
    cleaning = json.loads((root / "cleaning.json").read_text())
    why = {r["path"]: (r["action"], r["reason"]) for r in cleaning["records"]}
    assert why["cat/666.jpg"] == ("dropped", "corrupt") and why["cat/9999.jpg"] == ("dropped", "truncated")
    assert why["dog/11702.jpg"] == ("dropped", "empty") and why["cat/Thumbs.db"] == ("dropped", "not an image")
    renamed = next(r for r in cleaning["records"] if r["action"] == "renamed")
    assert renamed["path"] == "dog/8888.jpg" and renamed["to"] == "dog/8888.png" and "PNG" in renamed["reason"]
    assert str(tmp_path) not in (root / "cleaning.json").read_text()

    split = json.loads((root / "split.json").read_text())
    listed = split["train"] + split["val"] + split["test"]
    assert sorted(listed) == sorted(f"{c}/{f}" for c, fs in _tree(root).items() for f in fs)
    assert len(set(listed)) == 17 and (len(split["train"]), len(split["val"]), len(split["test"])) == (13, 2, 2)
    assert {p.split("/")[0] for p in split["test"]} == {"cat", "dog"} == {p.split("/")[0] for p in split["val"]}
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["source"] == "cats-vs-dogs" and meta["sha256"] == {MS_ZIP: _sha(archives[MS_ZIP])}
    assert meta["counts"] == {"cat": 8, "dog": 9} and meta["date"][:2] == "20"
    _no_leftovers(data, "cats-vs-dogs")


def test_rerun_is_a_noop_cache_is_reused_and_force_redoes(cli, server, monkeypatch, archives, tmp_path):
    _register(monkeypatch, server, archives)
    data = tmp_path / "data"
    _fetch(cli, "cats-vs-dogs", "--data-dir", data)
    before = (data / "cats-vs-dogs" / "dataset.json").stat().st_mtime_ns
    again = cli("fetch-data", "cats-vs-dogs", "--data-dir", data)
    assert again.exit_code == 0 and "already complete" in again.stdout
    assert len(server.requests) == 1 and (data / "cats-vs-dogs" / "dataset.json").stat().st_mtime_ns == before
    assert _fetch(cli, "cats-vs-dogs", "--data-dir", data)["up_to_date"]

    other = cli("fetch-data", "cats-vs-dogs", "--data-dir", data, "--split", "0.6,0.2,0.2")
    assert other.exit_code == 2 and "--force" in other.stderr
    assert (data / "cats-vs-dogs" / "dataset.json").stat().st_mtime_ns == before

    shutil.rmtree(data / "cats-vs-dogs")
    rebuilt = cli("fetch-data", "cats-vs-dogs", "--data-dir", data)
    assert rebuilt.exit_code == 0 and "archives from the cache" in rebuilt.stdout
    assert len(server.requests) == 1

    forced = _fetch(cli, "cats-vs-dogs", "--data-dir", data, "--split", "0.6,0.2,0.2", "--force")
    assert len(server.requests) == 2 and not forced["cached"] and forced["splits"] == {"train": 9, "val": 4, "test": 4}
    assert len(json.loads((data / "cats-vs-dogs" / "split.json").read_text())["val"]) == 4
    _no_leftovers(data, "cats-vs-dogs")


def test_oxford_pets_official_split_from_a_server_without_range(cli, server, monkeypatch, archives, tmp_path):
    _register(monkeypatch, server, archives, mode="norange-drop")
    data = tmp_path / "data"
    s = _fetch(cli, "oxford-pets", "--data-dir", data)
    for name in ("images.tar.gz", "annotations.tar.gz"):
        first, second = [r for r in server.requests if r["name"] == name]
        assert first["range"] is None and second["range"] == f"bytes={len(archives[name]) // 2}-"
        assert server.sent[name] == len(archives[name]) // 2 + len(archives[name])
    assert not s["resumed"]

    root = data / "oxford-pets"
    tree = _tree(root)
    assert list(tree) == ["Abyssinian", "Bengal", "beagle", "pug"]
    assert tree["Bengal"][-1] == "Bengal_6.png" and tree["pug"][-1] == "pug_6.gif"
    assert "beagle_6.jpg" not in tree["beagle"] and "Abyssinian_7.jpg" not in tree["Abyssinian"]
    assert s["counts"] == {"Abyssinian": 6, "Bengal": 6, "beagle": 5, "pug": 6} and s["split_source"] == "official"
    split = json.loads((root / "split.json").read_text())
    assert split["test"] == sorted(
        [
            "Abyssinian/Abyssinian_5.jpg",
            "Abyssinian/Abyssinian_6.jpg",
            "Bengal/Bengal_5.jpg",
            "Bengal/Bengal_6.png",
            "beagle/beagle_5.jpg",
            "pug/pug_5.jpg",
            "pug/pug_6.gif",
        ]
    )
    trainval = split["train"] + split["val"]
    assert sorted(trainval) == sorted(f"{b}/{b}_{n}.jpg" for b in BREEDS for n in range(1, 5))
    assert sorted(p.split("/")[0] for p in split["val"]) == sorted(BREEDS)
    cleaning = json.loads((root / "cleaning.json").read_text())
    dropped = {r["path"]: r["reason"] for r in cleaning["records"] if r["action"] == "dropped"}
    assert dropped == {
        "images/Abyssinian_100.mat": "not in the official trainval/test lists",
        "images/Abyssinian_7.jpg": "not in the official trainval/test lists",
        "beagle/beagle_6.jpg": "corrupt",
    }

    species = _fetch(cli, "oxford-pets", "--labels", "species", "--data-dir", data)
    assert species["path"] == str(data / "oxford-pets-species") and species["cached"]
    assert species["counts"] == {"cat": 12, "dog": 11} and len(server.requests) == 4
    species_split = json.loads((data / "oxford-pets-species" / "split.json").read_text())
    assert sorted(p.split("/")[1] for p in species_split["test"]) == sorted(p.split("/")[1] for p in split["test"])
    _no_leftovers(data, "oxford-pets")


def test_wrong_checksum_or_size_exits_2_and_leaves_nothing(cli, server, monkeypatch, archives, tmp_path):
    data = tmp_path / "data"
    _register(monkeypatch, server, archives, sha256="0" * 64)
    bad = cli("fetch-data", "cats-vs-dogs", "--data-dir", data)
    assert bad.exit_code == 2 and "sha256" in bad.stderr and "unpacked nothing" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.output
    assert not (data / "cats-vs-dogs").exists() and list((data / ".downloads").iterdir()) == []
    _no_leftovers(data, "cats-vs-dogs")

    _register(monkeypatch, server, archives, size=len(archives[MS_ZIP]) + 1)
    size = cli("fetch-data", "cats-vs-dogs", "--data-dir", data)
    assert size.exit_code == 2 and "were expected" in size.stderr and not (data / "cats-vs-dogs").exists()

    url = f"{server.url}/range/{MS_ZIP}"
    custom = cli("fetch-data", url, "--name", "pets", "--sha256", "f" * 64, "--data-dir", data)
    assert custom.exit_code == 2 and "sha256" in custom.stderr and not (data / "pets").exists()
    assert list((data / ".downloads").iterdir()) == []
    ok = _fetch(cli, url, "--name", "pets", "--sha256", _sha(archives[MS_ZIP]), "--data-dir", data)
    assert ok["classes"] == ["Cat", "Dog"] and ok["images"] == 17


def test_transient_errors_are_retried_and_permanent_ones_are_not(cli, server, monkeypatch, archives, tmp_path):
    _register(monkeypatch, server, archives, mode="flaky")
    data = tmp_path / "data"
    s = _fetch(cli, "cats-vs-dogs", "--data-dir", data)
    assert [r["mode"] for r in server.requests] == ["flaky", "flaky"] and s["images"] == 17

    missing = cli("fetch-data", f"{server.url}/range/nothing.zip", "--name", "x", "--data-dir", data)
    assert missing.exit_code == 2 and "HTTP 404" in missing.stderr

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    gone = cli("fetch-data", f"http://127.0.0.1:{closed_port}/a.zip", "--name", "y", "--data-dir", data)
    assert gone.exit_code == 1 and f"after {download.RETRIES + 1} attempts" in gone.stderr
    assert not (data / "x").exists() and not (data / "y").exists()


def test_not_enough_disk_space_stops_before_downloading(cli, server, monkeypatch, archives, tmp_path):
    _register(monkeypatch, server, archives)
    monkeypatch.setattr(sizes.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=10_000))
    result = cli("fetch-data", "cats-vs-dogs", "--data-dir", tmp_path / "data")
    assert result.exit_code == 2 and "not enough free space" in result.stderr
    assert server.requests == [] and not (tmp_path / "data" / "cats-vs-dogs").exists()


def _classes(tmp: Path) -> dict[str, bytes]:
    return {"pack/red/r.jpg": _photo(tmp, CAT, 1), "pack/blue/b.jpg": _photo(tmp, DOG, 2)}


@pytest.mark.parametrize(
    "kind,message",
    [
        ("zip-slip", "climbs out with '..'"),
        ("zip-absolute", "absolute path"),
        ("zip-symlink", "link pointing outside"),
        ("tar-slip", "climbs out with '..'"),
        ("tar-absolute", "absolute path"),
        ("tar-symlink", "link pointing outside"),
        ("tar-symlink-absolute", "link pointing outside"),
        ("tar-hardlink", "link pointing outside"),
        ("tar-fifo", "device or fifo"),
        ("tar-device", "device or fifo"),
    ],
)
def test_hostile_archives_are_refused(cli, server, tmp_path, kind, message):
    good = _classes(tmp_path)
    escape = tmp_path / "evil.txt"
    absolute = tmp_path / "abs-evil.txt"
    archive = {
        "zip-slip": lambda: _zip({**good, "../../../evil.txt": b"pwned"}),
        "zip-absolute": lambda: _zip({**good, str(absolute): b"pwned"}),
        "zip-symlink": lambda: _zip(good, links={"pack/red/link.jpg": "../../../../evil.txt"}),
        "tar-slip": lambda: _tar({**good, "pack/../../../../evil.txt": b"pwned"}),
        "tar-absolute": lambda: _tar({**good, str(absolute): b"pwned"}),
        "tar-symlink": lambda: _tar(good, [_special("pack/red/l.jpg", tarfile.SYMTYPE, "../../../../evil.txt")]),
        "tar-symlink-absolute": lambda: _tar(good, [_special("pack/red/l.jpg", tarfile.SYMTYPE, "/etc/passwd")]),
        "tar-hardlink": lambda: _tar(good, [_special("pack/red/h.jpg", tarfile.LNKTYPE, "../evil.txt")]),
        "tar-fifo": lambda: _tar(good, [_special("pack/red/f.jpg", tarfile.FIFOTYPE)]),
        "tar-device": lambda: _tar(good, [_special("pack/red/d.jpg", tarfile.CHRTYPE)]),
    }[kind]()
    name = f"evil.{'zip' if kind.startswith('zip') else 'tar.gz'}"
    server.files[name] = archive
    data = tmp_path / "data"
    result = cli("fetch-data", f"{server.url}/range/{name}", "--name", "evil", "--data-dir", data)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "refusing to unpack" in result.stderr and "Traceback" not in result.output
    assert not (data / "evil").exists() and not escape.exists() and not absolute.exists()
    assert list((data / ".downloads").iterdir()) == [], "refused archive kept in the cache"
    _no_leftovers(data, "evil")


def test_archives_over_the_caps_are_refused(server, tmp_path):
    data = tmp_path / "data"
    good = _classes(tmp_path)
    server.files["bomb.zip"] = _zip({**good, "pack/red/zeros.jpg": bytes(3_000_000)})
    server.files["bomb.tar.gz"] = _tar({**good, "pack/blue/zeros.jpg": bytes(3_000_000)})
    server.files["many.zip"] = _zip({**good, **{f"pack/red/{i}.jpg": b"x" for i in range(30)}})
    assert len(server.files["bomb.zip"]) < 50_000
    for name in ("bomb.zip", "bomb.tar.gz"):
        with pytest.raises(UsageError, match="possible zip bomb"):
            fetch(FetchRequest(f"{server.url}/range/{name}", name="bomb"), data_dir=data, max_bytes=1_000_000)
    with pytest.raises(UsageError, match="more than 10 files"):
        fetch(FetchRequest(f"{server.url}/range/many.zip", name="many"), data_dir=data, max_files=10)
    assert not (data / "bomb").exists() and not (data / "many").exists()
    _no_leftovers(data, "bomb")
    _no_leftovers(data, "many")
    fine = fetch(FetchRequest(f"{server.url}/range/bomb.zip", name="bomb"), data_dir=data, max_bytes=4_000_000)
    assert fine["counts"] == {"blue": 1, "red": 1} and fine["dropped"] == 1


PADDING = 256 * 2**20


class _Zeros(io.RawIOBase):
    """n zero bytes without holding them in memory."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def test_killed_mid_extraction_then_rerun_gives_a_complete_dataset(cli, server, tmp_path):
    entries = {}
    for i in range(6):
        entries[f"pack/red/r{i}.jpg"] = _photo(tmp_path, CAT, 500 + i)
        entries[f"pack/blue/b{i}.jpg"] = _photo(tmp_path, DOG, 600 + i)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        for i, (name, data) in enumerate(entries.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            if i == 5:
                big = tarfile.TarInfo("pack/padding.bin")
                big.size = PADDING
                tf.addfile(big, io.BufferedReader(_Zeros(PADDING)))
    server.files["big.tar.gz"] = buf.getvalue()
    sha = _sha(buf.getvalue())
    data = tmp_path / "data"
    url = f"{server.url}/range/big.tar.gz"
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    args = ["fetch-data", url, "--name", "big", "--sha256", sha, "--data-dir", str(data), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "tlcli", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    partial = []
    while not partial and proc.poll() is None and time.monotonic() < deadline:
        partial = list(data.glob(".big.staging-*/raw/pack/padding.bin"))
        time.sleep(0.002)
    assert partial and proc.poll() is None, f"fetch ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial[0].stat().st_size < PADDING, "killed after the archive was fully unpacked"
    assert not (data / "big").exists()
    assert json.loads((data / "big.lock").read_text())["pid"] == proc.pid  # its kernel lock died with it
    assert (data / ".downloads").is_dir() and list(data.glob(".big.staging-*"))

    s = _fetch(cli, url, "--name", "big", "--sha256", sha, "--data-dir", data)
    assert s["counts"] == {"blue": 6, "red": 6} and s["downloaded_bytes"] == 0 and s["cached"]
    assert _tree(data / "big") == {"blue": [f"b{i}.jpg" for i in range(6)], "red": [f"r{i}.jpg" for i in range(6)]}
    split = json.loads((data / "big" / "split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(
        f"{c}/{f}" for c, fs in _tree(data / "big").items() for f in fs
    )
    _no_leftovers(data, "big")
    assert len([r for r in server.requests if r["name"] == "big.tar.gz"]) == 1


def test_concurrent_fetch_gets_the_lock_message_then_waits(cli, server, monkeypatch, archives, tmp_path):
    _register(monkeypatch, server, archives)
    data = tmp_path / "data"
    data.mkdir()
    with lock_held(data / "cats-vs-dogs.lock") as holder:
        busy = cli("fetch-data", "cats-vs-dogs", "--data-dir", data)
        assert busy.exit_code == 2
        assert f"already fetching cats-vs-dogs (pid {holder.pid}" in busy.stderr and "--wait" in busy.stderr
        assert not (data / "cats-vs-dogs").exists() and server.requests == []

        done: dict = {}
        waiter = threading.Thread(
            target=lambda: done.update(fetch(FetchRequest("cats-vs-dogs"), data_dir=data, wait=True))
        )
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and server.requests == []
    waiter.join(timeout=60)
    assert not waiter.is_alive() and done["images"] == 17 and (data / "cats-vs-dogs" / "dataset.json").is_file()
    _no_leftovers(data, "cats-vs-dogs")


def test_local_folder_is_copied_and_local_archive_checked(cli, archives, tmp_path):
    mine = tmp_path / "mine" / "wrapper"
    for i in range(5):
        make_photo(mine / "roses" / f"r{i}.jpg", CAT, seed=i)
        make_photo(mine / "tulips" / f"t{i}.jpg", DOG, seed=10 + i)
    (mine / "roses" / "broken.jpg").write_bytes(b"nope")
    data = tmp_path / "data"
    s = _fetch(cli, tmp_path / "mine", "--name", "flowers", "--data-dir", data)
    assert s["counts"] == {"roses": 5, "tulips": 5} and s["dropped"] == 1 and s["split_source"] == "stratified"
    assert (mine / "roses" / "broken.jpg").exists() and len(list((mine / "roses").iterdir())) == 6
    assert not (data / "flowers" / "roses" / "broken.jpg").exists()

    single = tmp_path / "single"
    make_photo(single / "only" / "a.jpg", CAT)
    one = cli("fetch-data", single, "--name", "one", "--data-dir", data)
    assert one.exit_code == 2 and "at least two" in one.stderr and not (data / "one").exists()

    local = tmp_path / "local.zip"
    local.write_bytes(archives[MS_ZIP])
    wrong = cli("fetch-data", local, "--sha256", "a" * 64, "--data-dir", data)
    assert wrong.exit_code == 2 and "sha256" in wrong.stderr and not (data / "local").exists()
    ok = _fetch(cli, local, "--data-dir", data)
    assert ok["path"] == str(data / "local") and ok["counts"] == {"Cat": 8, "Dog": 9}
    assert local.exists() and not (data / ".downloads").exists()


def test_fetched_dataset_runs_extract_train_evaluate(cli, server, monkeypatch, archives, tmp_path):
    _register(monkeypatch, server, archives)
    data = tmp_path / "data"
    fetched = _fetch(cli, "cats-vs-dogs", "--data-dir", data)
    ex = cli("extract", data / "cats-vs-dogs", "--out", tmp_path / "features", *FAST, "--json")
    assert ex.exit_code == 0, ex.output
    summary = json.loads(ex.stdout)
    assert summary["skipped"] == [] and summary["split_source"] == "split.json"
    assert summary["splits"] == fetched["splits"] == {"train": 13, "val": 2, "test": 2}
    train = cli("train-head", tmp_path / "features", "--out", tmp_path / "runs", "--epochs", "5", "--quiet")
    assert train.exit_code == 0, train.output
    ev = cli("evaluate", tmp_path / "runs" / "latest", "--json", "--quiet")
    assert ev.exit_code == 0, ev.output
    result = json.loads(ev.stdout)
    assert result["n"] == 2 and set(result["per_class"]) == {"cat", "dog"}


def test_cleaning_keeps_jpegs_over_the_pixel_limit_and_still_drops_them_truncated(tmp_path, monkeypatch):
    """A JPEG over the decompression-bomb limit (a 200 MP phone photo) is verified at reduced scale and
    kept; cut short, it is dropped; other formats over the limit are still refused."""
    from PIL import Image as PILImage

    from tlcli.data import images

    monkeypatch.setattr(images, "MAX_PIXELS", 2_000_000)
    big = tmp_path / "photos" / "big"
    big.mkdir(parents=True)
    coarse = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    pixels = np.asarray(PILImage.fromarray(coarse).resize((3000, 2000), PILImage.BILINEAR))
    PILImage.fromarray(pixels).save(big / "whole.jpg", quality=90)
    data = (big / "whole.jpg").read_bytes()
    (big / "cut.jpg").write_bytes(data[: len(data) // 2])
    PILImage.fromarray(pixels).save(big / "whole.png")
    records = {r["path"]: r for r in clean(tmp_path / "photos")}
    assert (big / "whole.jpg").read_bytes() == data and "big/whole.jpg" not in records
    assert records["big/cut.jpg"]["action"] == "dropped" and records["big/cut.jpg"]["reason"] == "truncated"
    assert records["big/whole.png"]["action"] == "dropped" and "over the limit" in records["big/whole.png"]["detail"]
    assert sorted(p.name for p in big.iterdir()) == ["whole.jpg"]
    assert images.load(big / "whole.jpg", 224).shape == (224, 224, 3)  # extract reads it the same way
