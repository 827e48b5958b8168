"""report.html: one self-contained page per run and per evaluation, built from the files its folder holds.

It shows the run's recipe and data counts, its curves, the confusion matrix, per-class scores, the photos to
look at (mistakes, most confident first, filled to FILL with the least confident correct ones) and any other
figure or JSON the folder holds (a ``reliability.png``, an ``audit.json``). No TensorFlow: a report of an
old run is rebuilt from its files alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tlcli.errors import UsageError
from tlcli.store import files, runs
from tlcli.train import html
from tlcli.train.metrics import LEAST_CONFIDENT

REPORT = "report.html"
FILL = LEAST_CONFIDENT
MAX_PHOTOS = 200
MAX_ROWS = 200
SHOWN = {"meta.json", "history.json", "metrics.json", "misclassified.json", "least_confident.json"}
SHOWN_FIGURES = {"curves.png", "confusion.png"}


def _read(path: Path) -> object | None:
    """A JSON file, or None when it is missing or damaged (a report shows what it can)."""
    if not path.is_file():
        return None
    try:
        return files.read_json(path)
    except UsageError:
        return None


@dataclass(frozen=True)
class Folder:
    """A run or evaluation folder (``shown_path``: where it is published), the run it belongs to (None if
    unknown) and their JSON files."""

    path: Path
    name: str
    shown_path: Path
    run_dir: Path | None
    meta: dict
    metrics: dict

    @classmethod
    def of(cls, path: Path, name: str | None = None) -> Folder:
        metrics = _read(path / "metrics.json") or {}
        run_dir = path if (path / "meta.json").is_file() else None
        if run_dir is None and metrics.get("run") and (Path(metrics["run"]) / "meta.json").is_file():
            run_dir = Path(metrics["run"])
        meta = (_read(run_dir / "meta.json") if run_dir else None) or {}
        where = path.resolve().parent / name if name else path.resolve()
        return cls(path, where.name, where, run_dir, meta, metrics)

    @property
    def is_run(self) -> bool:
        return self.run_dir == self.path


def _top_k(metrics: dict) -> tuple[str, float | None]:
    """The top-k accuracy under its one name, or the ``top_5_accuracy`` older runs wrote."""
    if "top_k_accuracy" in metrics:
        return f"top-{metrics.get('top_k', '?')}", metrics["top_k_accuracy"]
    old = next((k for k in metrics if re.fullmatch(r"top_\d+_accuracy", k)), None)
    return (old.removesuffix("_accuracy").replace("_", "-"), metrics[old]) if old else ("top-k", None)


def _header(f: Folder) -> str:
    m, meta = f.metrics, f.meta
    kind = "run" if f.is_run else "evaluation"
    source = m.get("source") or (f"{m['split']} split" if m.get("split") else None)
    where = f"{meta.get('backbone', '?')} on {len(meta.get('classes', m.get('classes', [])))} classes"
    top_name, top_value = _top_k(m)
    numbers = [
        ("accuracy", m.get("accuracy")),
        (top_name, top_value),
        ("macro F1", m.get("macro_f1")),
        ("photos", m.get("n")),
    ]
    if f.is_run:
        numbers += [("val accuracy", meta.get("val_accuracy")), ("train accuracy", meta.get("train_accuracy"))]
    return (
        f"<h1>tlcli {kind} report: {html.text(f.name)}</h1>"
        f'<p class="sub">{html.text(where)}{" &middot; " + html.text(source) if source else ""} &middot; '
        f"{html.text(str(f.shown_path))}</p>" + html.stats(numbers)
    )


def _flat(doc: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested settings as ``head.dropout``-style rows; long lists (a run's test files) are left out."""
    rows = []
    for key, value in doc.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        elif not isinstance(value, list) or len(value) <= 8:
            rows.append((f"{prefix}{key}", ", ".join(map(str, value)) if isinstance(value, list) else value))
    return rows


def _recipe(meta: dict) -> str:
    """What made the run: features, both recipes, data counts, seed and versions."""
    if not meta:
        return ""
    counts = meta.get("counts", {})
    data = html.table(["split", "photos"], [(s, counts[s]) for s in counts])
    made = {k: meta.get(k) for k in ("backbone", "alpha", "input_size", "resize", "weights", "seed", "data_dir")}
    recipe = {**made, "head": meta.get("head") or {}, "fine_tune": meta.get("fine_tune") or "none"}
    classes = meta.get("classes", [])
    more = html.details(f"{len(classes)} classes", html.text(", ".join(classes))) + html.details(
        "versions", html.table(["package", "version"], (meta.get("versions") or {}).items())
    )
    return html.section(
        "Recipe and data", html.row(html.table(["setting", "value"], _flat(recipe)), data + more), anchor="recipe"
    )


def _confusion(f: Folder) -> str:
    side = 380 + 18 * len(f.metrics.get("classes", []))
    picture = html.figure(f.path / "confusion.png", "confusion matrix", max_width=side)
    cm, classes = f.metrics.get("confusion"), f.metrics.get("classes", [])
    if picture or not cm or len(classes) > 40:
        return html.section("Confusion matrix (rows true, columns predicted)", picture, anchor="confusion")
    rows = [(c, *row) for c, row in zip(classes, cm, strict=False)]
    return html.section("Confusion matrix (rows true, columns predicted)", html.table(["", *classes], rows))


def _per_class(metrics: dict) -> str:
    per_class = metrics.get("per_class") or {}
    rows = [(name, c["precision"], c["recall"], c["f1"], c["support"]) for name, c in per_class.items()]
    return html.section(
        "Per class", html.table(["class", "precision", "recall", "F1", "support"], rows) if rows else "", anchor="class"
    )


def _card(record: dict, kind: str) -> str:
    lines = [f"true: {record.get('true')}", f"predicted: {record.get('predicted')} ({record.get('confidence')})"]
    return html.photo_card(str(record.get("path", "")), lines, kind)


def _photos(f: Folder) -> str:
    """Mistakes, most confident first, then the least confident correct photos until there are FILL cards."""
    wrong, unsure = _read(f.path / "misclassified.json"), _read(f.path / "least_confident.json")
    if not isinstance(wrong, list):
        note = "This folder holds no per-photo predictions (written before tlcli kept them); 'tlcli evaluate RUN'"
        return html.section("Photos to look at", f"<p>{note} writes an evaluation whose report shows them.</p>")
    unsure = unsure if isinstance(unsure, list) else []
    shown = wrong[:MAX_PHOTOS]
    fill = unsure[: max(0, FILL - len(shown))]
    cards = [_card(r, "wrong") for r in shown] + [_card(r, "unsure") for r in fill]
    note = f"{len(wrong)} misclassified" + (
        f" (the {MAX_PHOTOS} most confident shown)" if len(wrong) > len(shown) else ""
    )
    if fill:
        note += f", then the {len(fill)} correct photo(s) the model was least sure of (yellow)"
    intro = f'<p class="sub">{html.text(note)}; red: wrong, most confident first. Hover a photo for its path.</p>'
    return html.section("Photos to look at", intro, f'<div class="grid">{"".join(cards)}</div>', anchor="photos")


def _json_block(name: str, doc: object) -> str:
    """Any JSON generically: photo records as cards, other records as a table, the rest as text."""
    records = doc if isinstance(doc, list) else None
    if isinstance(doc, dict):
        lists = {k: v for k, v in doc.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        rest = {k: v for k, v in doc.items() if k not in lists}
        parts = [html.preformatted(rest) if rest else ""]
        parts += [_json_block(f"{name}: {k}", v) for k, v in lists.items()]
        return f"<h3>{html.text(name)}</h3>" + "".join(parts)
    if records and all(isinstance(r, dict) for r in records):
        if all("path" in r for r in records):
            cards = [
                html.photo_card(str(r["path"]), [f"{k}: {v}" for k, v in r.items() if k != "path"])
                for r in records[:MAX_PHOTOS]
            ]
            return f'<h3>{html.text(name)} ({len(records)})</h3><div class="grid">{"".join(cards)}</div>'
        keys = list(dict.fromkeys(k for r in records for k in r))
        rows = [[r.get(k) for k in keys] for r in records[:MAX_ROWS]]
        return f"<h3>{html.text(name)} ({len(records)})</h3>" + html.table(keys, rows)
    return f"<h3>{html.text(name)}</h3>" + html.preformatted(doc)


def _extras(f: Folder) -> str:
    """Every other figure and JSON file of the folder (calibration, unknown inputs, audits, ...), as found."""
    figures = [
        f"<h3>{html.text(p.stem.replace('_', ' '))}</h3>{html.figure(p, p.name)}"
        for p in sorted(f.path.glob("*.png"))
        if p.name not in SHOWN_FIGURES
    ]
    found = {p.name: _read(p) for p in sorted(f.path.glob("*.json")) if p.name not in SHOWN}
    docs = [_json_block(name, doc) for name, doc in found.items() if doc is not None]
    return html.section("More from this folder", *figures, *docs, anchor="more")


def _evaluations(f: Folder) -> str:
    """Links to the run's evaluations' own reports (sibling files, opened from disk)."""
    if not f.is_run:
        return ""
    found = sorted(p for p in (f.path / "evaluations").glob(f"*/{REPORT}"))
    links = [
        f'<li><a href="evaluations/{html.text(p.parent.name)}/{REPORT}">{html.text(p.parent.name)}</a></li>'
        for p in found
    ]
    return html.section("Evaluations", f"<ul>{''.join(links)}</ul>" if links else "", anchor="evaluations")


def build(folder: str | os.PathLike, name: str | None = None) -> str:
    """The report page of a run or evaluation folder (``name``: the run's name when built before publishing)."""
    f = Folder.of(Path(folder), name)
    run = f.run_dir
    log = (f.path / "train.log").read_text(errors="replace") if f.is_run and (f.path / "train.log").is_file() else ""
    sections = [
        _header(f),
        _recipe(f.meta),
        html.row(
            html.section("Training curves", html.figure(run / "curves.png", "training curves", 700) if run else ""),
            _confusion(f),
            _per_class(f.metrics),
        ),
        _photos(f),
        _extras(f),
        _evaluations(f),
        html.section("Training log", html.details("train.log", html.preformatted(log)) if log else ""),
        f'<p class="sub">built {datetime.now(UTC).isoformat(timespec="seconds")} by tlcli report</p>',
    ]
    return html.page(f"tlcli report: {f.name}", sections)


def write_report(folder: str | os.PathLike, name: str | None = None) -> Path:
    """Build and atomically write ``folder/report.html``; return its path."""
    path = Path(folder) / REPORT
    files.write_bytes(path, build(folder, name).encode())
    return path


def rebuild(path: str | os.PathLike) -> list[Path]:
    """Rewrite the report of a run (and of each of its evaluations) or of one evaluation folder.

    Returns the reports written, ``path``'s own first.
    """
    p = Path(path)
    if (p / "metrics.json").is_file() and not (p / "model.keras").is_file():
        return [write_report(p)]
    run = runs.resolve_run(p)
    evaluations = sorted(e.parent for e in (run / "evaluations").glob("*/metrics.json"))
    written = [write_report(e) for e in evaluations]
    return [write_report(run), *written]
