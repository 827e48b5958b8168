"""The datasets tlcli knows how to fetch: their files, sizes, checksums, licences and source pages.

Setting ``TLCLI_DATASET_MIRROR=URL`` fetches their files from ``URL/<file name>`` instead of the upstream
host (same bytes, same checksums): for mirrors, air-gapped caches and tests.
"""

from __future__ import annotations

import os
import posixpath
import urllib.parse
from dataclasses import dataclass

MIRROR_ENV = "TLCLI_DATASET_MIRROR"


@dataclass(frozen=True)
class Remote:
    """One downloadable file of a known dataset and what its bytes must be."""

    url: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return posixpath.basename(urllib.parse.urlsplit(self.url).path)


@dataclass(frozen=True)
class Known:
    """A dataset tlcli knows how to fetch and lay out."""

    name: str
    description: str
    layout: str
    files: tuple[Remote, ...]
    classes: str
    licence: str
    homepage: str

    @property
    def size(self) -> int:
        return sum(r.size for r in self.files)


REGISTRY: dict[str, Known] = {
    "cats-vs-dogs": Known(
        name="cats-vs-dogs",
        description="Microsoft's Kaggle Cats and Dogs (Asirra / Petfinder photos), about 25,000 photos before cleaning",
        layout="petimages",
        files=(
            Remote(
                "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
                "kagglecatsanddogs_5340.zip",
                824887076,
                "b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9",
            ),
        ),
        classes="cat, dog",
        licence="Microsoft download terms (see the source page); photos from Petfinder.com",
        homepage="https://www.microsoft.com/en-us/download/details.aspx?id=54765",
    ),
    "oxford-pets": Known(
        name="oxford-pets",
        description="Oxford-IIIT Pet: 7,349 photos of 37 cat and dog breeds with the official trainval/test split",
        layout="oxford",
        files=(
            Remote(
                "https://thor.robots.ox.ac.uk/~vgg/data/pets/images.tar.gz",
                791918971,
                "67195c5e1c01f1ab5f9b6a5d22b8c27a580d896ece458917e61d459337fa318d",
            ),
            Remote(
                "https://thor.robots.ox.ac.uk/~vgg/data/pets/annotations.tar.gz",
                19173078,
                "52425fb6de5c424942b7626b428656fcbd798db970a937df61750c0f1d358e91",
            ),
        ),
        classes="37 breeds (cat, dog with --labels species)",
        licence="CC BY-SA 4.0; image copyright stays with the original owners",
        homepage="https://www.robots.ox.ac.uk/~vgg/data/pets/",
    ),
}


def remote_url(remote: Remote) -> str:
    """The URL to fetch ``remote`` from: upstream, or ``$TLCLI_DATASET_MIRROR/<file name>``."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{remote.filename}" if mirror else remote.url


def known_datasets() -> list[dict]:
    """The registry as plain dicts, for ``--list``."""
    return [
        {
            "name": k.name,
            "description": k.description,
            "classes": k.classes,
            "bytes": k.size,
            "licence": k.licence,
            "homepage": k.homepage,
            "files": [{"url": remote_url(r), "bytes": r.size, "sha256": r.sha256} for r in k.files],
        }
        for k in REGISTRY.values()
    ]
