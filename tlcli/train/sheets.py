"""Contact sheets: photos as captioned thumbnails in a grid, one PNG a person can skim (PIL only, no matplotlib)."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

from tlcli.data import images
from tlcli.store import files

THUMB = 160
LINE = 14
CAPTION_LINES = 3
BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)


class Tile(NamedTuple):
    """One photo of a sheet and its caption lines, the first drawn in ``colour``."""

    path: str | os.PathLike
    caption: tuple[str, ...]
    colour: tuple[int, int, int] = (0, 0, 0)


def _thumbnail(path: str | os.PathLike) -> Image.Image:
    """The photo decoded as tlcli decodes it, padded to a square thumbnail; a grey square when it will not decode."""
    try:
        return images.fit(images.decode(path, THUMB), THUMB, "pad")
    except (images.ImageError, OSError):
        return Image.new("RGB", (THUMB, THUMB), MISSING)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font) -> str:
    """``text`` shortened from the left (paths keep their file name) to fit under a thumbnail."""
    while len(text) > 4 and draw.textlength(text, font=font) > THUMB:
        text = "..." + text[4:]
    return text


def contact_sheet(tiles: list[Tile], path: str | os.PathLike, columns: int = 6) -> None:
    """Draw ``tiles`` row by row, each thumbnail over its caption, and write the PNG atomically."""
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / columns))
    cell_w, cell_h = THUMB + 8, THUMB + 8 + LINE * CAPTION_LINES
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for n, tile in enumerate(tiles):
        x, y = (n % columns) * cell_w + 4, (n // columns) * cell_h + 4
        sheet.paste(_thumbnail(tile.path), (x, y))
        for line, text in enumerate(tile.caption[:CAPTION_LINES]):
            colour = tile.colour if line == 0 else (60, 60, 60)
            draw.text((x, y + THUMB + 2 + line * LINE), _fit_text(draw, text, font), fill=colour, font=font)
    files.write_bytes(path, images.png_bytes(sheet))
