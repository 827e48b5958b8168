"""HTML pieces for a self-contained report page: escaped text, tables, images inlined as data: URIs, photo cards.

Nothing here fetches anything: every image is embedded, there are no scripts, and links point only inside
the page or to sibling files.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

from tlcli.data import images

THUMB_SIDE = 160
THUMB_QUALITY = 75

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:0 18px 40px;
color:#1f2328}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #d0d7de;
padding-bottom:4px}.sub{color:#57606a;margin:0 0 10px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.stat{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px}
.stat b{display:block;font-size:20px}.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
img.fig{max-width:100%;height:auto;border:1px solid #eee}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(176px,1fr));gap:10px}
.photo{border:3px solid #d0d7de;border-radius:6px;padding:6px;font-size:12px;overflow-wrap:anywhere}
.photo.wrong{border-color:#cf222e}.photo.unsure{border-color:#d4a72c}
.photo img{display:block;margin:0 auto 4px;max-width:160px;max-height:160px}
.gone{height:100px;display:flex;align-items:center;justify-content:center;background:#f6f8fa;color:#57606a}
pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:420px;font-size:12px}
"""


def text(value: object) -> str:
    """``value`` as escaped HTML text (None as a dash, floats to 4 places)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def page(title: str, sections: Iterable[str]) -> str:
    """A whole HTML document: UTF-8, inline style, the sections in order."""
    body = "\n".join(s for s in sections if s)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def section(heading: str, *parts: str, anchor: str = "") -> str:
    """An ``<h2>`` and its content; empty when there is no content."""
    content = "\n".join(p for p in parts if p)
    if not content:
        return ""
    ident = f' id="{escape(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{escape(heading)}</h2>\n{content}\n</section>"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain table: the header row, then each row's values as text."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{text(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def row(*parts: str) -> str:
    """Blocks side by side, wrapping on a narrow screen."""
    return '<div class="row">' + "".join(f"<div>{p}</div>" for p in parts if p) + "</div>"


def stats(pairs: Iterable[tuple[str, object]]) -> str:
    """Headline numbers as a row of boxes."""
    boxes = "".join(f'<div class="stat">{escape(k)}<b>{text(v)}</b></div>' for k, v in pairs if v is not None)
    return f'<div class="cards">{boxes}</div>'


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure(path: Path, alt: str, max_width: int | None = None) -> str:
    """A PNG or JPEG file inlined as an ``<img>`` (at most ``max_width`` CSS pixels wide); empty when missing."""
    if not path.is_file():
        return ""
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    width = f' style="width:{max_width}px;max-width:100%"' if max_width else ""
    return f'<img class="fig" alt="{escape(alt)}"{width} src="{data_uri(path.read_bytes(), mime)}">'


def thumbnail(path: str | os.PathLike) -> bytes | None:
    """A JPEG at most THUMB_SIDE on a side of a photo decoded as tlcli decodes it; None when it cannot be read."""
    try:
        im = images.decode(path, THUMB_SIDE)
    except (images.ImageError, OSError):
        return None
    im.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return buf.getvalue()


def photo_card(path: str, lines: Sequence[str], kind: str = "") -> str:
    """One photo's thumbnail (or a note that it is gone) with caption lines; ``kind`` styles the border."""
    thumb = thumbnail(path)
    name = "/".join(Path(path).parts[-2:])
    picture = (
        f'<img alt="{escape(name)}" src="{data_uri(thumb, "image/jpeg")}">'
        if thumb
        else '<div class="gone">photo not readable</div>'
    )
    caption = "<br>".join(escape(line) for line in lines)
    return f'<div class="photo {kind}" title="{escape(path)}">{picture}{caption}<br><small>{escape(name)}</small></div>'


def preformatted(doc: object, limit: int = 20_000) -> str:
    """JSON (or text) in a ``<pre>``, cut at ``limit`` characters."""
    body = doc if isinstance(doc, str) else json.dumps(doc, indent=2, default=str)
    if len(body) > limit:
        body = body[:limit] + f"\n... ({len(body) - limit} more characters)"
    return f"<pre>{escape(body)}</pre>"


def details(summary: str, content: str) -> str:
    """A collapsed block a reader can open."""
    return f"<details><summary>{escape(summary)}</summary>{content}</details>" if content else ""
