"""What to fetch: the request a user makes, checked and resolved into a plan (kind of source, name, record)."""

from __future__ import annotations

import difflib
import posixpath
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from tlcli.data.datasets import DEFAULT_FRACTIONS
from tlcli.data.fetch.registry import REGISTRY, Known
from tlcli.errors import UsageError

LABELS = ("breeds", "species")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")


@dataclass(frozen=True)
class FetchRequest:
    """A known dataset, an archive URL, a local archive or a folder, and how to name, label and split it."""

    source: str
    name: str | None = None
    labels: str | None = None
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    seed: int = 0
    sha256: str | None = None


@dataclass(frozen=True)
class Plan:
    """A checked request: what kind of source it is, the dataset's name, and the request as dataset.json records it."""

    request: FetchRequest
    kind: str
    name: str
    source: str
    recorded: dict
    known: Known | None = None
    url: str | None = None
    path: Path | None = None
    labels: str | None = None

    @property
    def official_split(self) -> bool:
        return self.known is not None and self.known.layout == "oxford"


def _default_name(base: str) -> str:
    lower = base.lower()
    stem = next((base[: -len(s)] for s in ARCHIVE_SUFFIXES if lower.endswith(s)), base)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")
    if not name or not NAME_PATTERN.match(name):
        raise UsageError(f"cannot make a dataset name from {base!r}; pass --name NAME")
    return name


def _check_options(r: FetchRequest) -> None:
    if r.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", r.sha256):
        raise UsageError(f"--sha256 {r.sha256!r} is not a sha256 (64 hex digits)")
    if r.labels is not None and r.labels not in LABELS:
        raise UsageError(f"--labels {r.labels!r} must be one of {', '.join(LABELS)}")
    if r.source in REGISTRY:
        if r.sha256:
            raise UsageError(f"{r.source} carries its own checksums; --sha256 is for URLs and local archives")
        if r.labels and REGISTRY[r.source].layout != "oxford":
            raise UsageError(f"--labels applies to oxford-pets only, not {r.source}")
    elif r.labels:
        raise UsageError("--labels applies to oxford-pets only")


def _known_plan(r: FetchRequest) -> Plan:
    known = REGISTRY[r.source]
    split = {"split": list(r.fractions), "seed": r.seed}
    if known.layout != "oxford":
        recorded = {"source": r.source, **split}
        return Plan(r, "known", r.name or r.source, r.source, recorded, known=known)
    labels = r.labels or "breeds"
    default = r.source if labels == "breeds" else f"{r.source}-{labels}"
    recorded = {"source": r.source, "labels": labels, "split": "official", "seed": r.seed}
    return Plan(r, "known", r.name or default, r.source, recorded, known=known, labels=labels)


def _local_plan(r: FetchRequest) -> Plan:
    path = Path(r.source).expanduser()
    if not path.exists():
        close = difflib.get_close_matches(r.source, list(REGISTRY), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(
            f"{r.source} is neither a known dataset nor an existing file or folder; {hint}see 'tlcli fetch-data --list'"
        )
    path = path.resolve()
    kind = "folder" if path.is_dir() else "archive"
    recorded = {"source": str(path), "split": list(r.fractions), "seed": r.seed}
    return Plan(r, kind, r.name or _default_name(path.name), str(path), recorded, path=path)


def _source_plan(r: FetchRequest) -> Plan:
    if r.source in REGISTRY:
        return _known_plan(r)
    if re.match(r"^https?://", r.source, re.I):
        base = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(r.source).path))
        recorded = {"source": r.source, "split": list(r.fractions), "seed": r.seed}
        return Plan(r, "url", r.name or _default_name(base or "dataset"), r.source, recorded, url=r.source)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", r.source):
        raise UsageError(f"{r.source}: only http:// and https:// URLs can be fetched")
    return _local_plan(r)


def resolve(request: FetchRequest) -> Plan:
    """Check the request's options and work out what its source is; one-line UsageError when it makes no sense."""
    _check_options(request)
    plan = _source_plan(request)
    if not NAME_PATTERN.match(plan.name):
        raise UsageError(f"--name {plan.name!r} must be letters, digits, '.', '_' or '-' (not starting with . - _)")
    return plan
