"""The one image-loading path: every format and oddity becomes RGB pixels or a clear ImageError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tlcli.data import images

from .conftest import make_photo


def test_jpeg_png_gif_bmp_decode_to_rgb(tmp_path):
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp")):
        path = make_photo(tmp_path / f"x.{ext}", (200, 30, 30), fmt=fmt)
        arr = images.load(path, 32)
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
        assert arr[..., 0].mean() > arr[..., 2].mean() + 60, fmt


def test_png_with_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 10:, 3] = 255  # left half transparent red, right half opaque red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    im = np.asarray(images.decode(tmp_path / "a.png"))
    assert tuple(im[5, 2]) == (255, 255, 255)
    assert tuple(im[5, 15]) == (255, 0, 0)


def test_cmyk_jpeg_and_16bit_grey_png(tmp_path):
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rgb = images.load(tmp_path / "cmyk.jpg", 16)
    assert rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60
    grey16 = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    arr = np.asarray(images.decode(tmp_path / "g16.png"))
    assert arr.shape == (30, 40, 3)
    assert arr[0, 0, 0] < 5 and arr[-1, -1, 0] > 250
    assert (arr[..., 0] == arr[..., 1]).all()


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    upright = images.decode(tmp_path / "rot.jpg")
    assert upright.size == (20, 40)
    top = np.asarray(upright)[:10].mean(axis=(0, 1))
    assert top[0] > 200  # the red half is now on top


@pytest.mark.parametrize(
    "content,reason",
    [(b"", "empty file"), (b"this is a text file, not a photo\n", "cannot identify")],
)
def test_not_an_image_raises_image_error(tmp_path, content, reason):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    with pytest.raises(images.ImageError, match=reason):
        images.decode(bad)


def test_truncated_jpeg_raises(tmp_path):
    good = make_photo(tmp_path / "good.jpg", (10, 200, 10), size=(200, 160))
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageError):
        images.decode(tmp_path / "cut.jpg")


def test_resize_policies_keep_or_ignore_aspect(tmp_path):
    arr = np.zeros((50, 100, 3), np.uint8)
    arr[:, :25] = 255  # white left quarter
    Image.fromarray(arr).save(tmp_path / "wide.png")
    im = images.decode(tmp_path / "wide.png")
    squash = np.asarray(images.fit(im, 40, "squash"))
    crop = np.asarray(images.fit(im, 40, "crop"))
    pad = np.asarray(images.fit(im, 40, "pad"))
    assert squash.shape == crop.shape == pad.shape == (40, 40, 3)
    assert squash[20, 5, 0] == 255  # left quarter still visible when squashed
    assert crop[20, 5, 0] == 0  # centre crop cuts the white quarter away
    assert pad[2, 20, 0] == images.PAD_VALUE and pad[20, 2, 0] == 255  # grey bars top and bottom


def test_batches_mark_bad_files_and_keep_order(tmp_path):
    paths = [make_photo(tmp_path / f"ok{i}.png", (i * 50, 0, 0), fmt="PNG") for i in range(3)]
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    order = [paths[0], tmp_path / "bad.jpg", paths[1], paths[2]]
    got = list(images.batches([str(p) for p in order], 16, "crop", batch_size=3))
    pixels = np.concatenate([g[0] for g in got])
    ok = np.concatenate([g[1] for g in got])
    assert ok.tolist() == [True, False, True, True]
    assert pixels[2, ..., 0].mean() > pixels[0, ..., 0].mean()
    assert "cannot identify" in got[0][2][1]


def test_unicode_file_name(tmp_path):
    path = make_photo(tmp_path / "chat_noir_été_猫.jpg", (30, 30, 30))
    ((pixels, ok, _),) = list(images.batches([str(path)], 16))
    assert ok[0] and pixels.shape == (1, 16, 16, 3)


def test_multi_view_policy_stacks_views(tmp_path):
    path = make_photo(tmp_path / "wide.png", (200, 30, 30), size=(80, 40), fmt="PNG")
    both = images.load(path, 32, "crop+pad")
    assert both.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(both[0], images.load(path, 32, "crop"))
    np.testing.assert_array_equal(both[1], images.load(path, 32, "pad"))
    with pytest.raises(images.UsageError, match="unknown resize policy"):
        images.load(path, 32, "crop+zoom")
