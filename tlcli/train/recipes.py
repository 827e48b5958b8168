"""The recipes of extract, train-head and fine-tuning: the one source of their defaults (no TensorFlow here).

A recipe is a frozen dataclass passed whole to the library, as timm's and TF Hub's trainers pass an
HParams object. Each field is named as ``meta.json`` records it; where the command-line option has
another name (``--lr`` for ``learning_rate``), the field's metadata says so, and ``option`` and
``from_options`` are the only places that translate between the two.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R")

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def _opt(default: Any, option: str) -> Any:
    return field(default=default, metadata={"option": option})


@dataclass(frozen=True)
class ExtractRecipe:
    """How photos become feature vectors: the backbone, its input, and the split of the folder."""

    backbone: str = "mobilenet"
    alpha: float | None = None
    size: int | None = None
    weights: str = "imagenet"
    resize: str = "crop+pad"
    flip_average: bool = _opt(False, "flip")
    fractions: tuple[float, float, float] = _opt(SPLIT_FRACTIONS, "split")
    seed: int = 0
    batch_size: int = 32
    precision: str = "float32"


@dataclass(frozen=True)
class HeadRecipe:
    """The softmax head on stored features, shared by train-head, cross-validate and ``tlcli run``."""

    epochs: int = 600
    batch_size: int = 64
    learning_rate: float = _opt(1e-3, "lr")
    dropout: float = 0.5
    l2: float = 1e-3
    patience: int = 30
    refit: bool = True
    balance: bool = True
    seed: int = 0


@dataclass(frozen=True)
class FineTuneRecipe:
    """What to unfreeze and how to train end to end; ``learning_rate`` None means the head's / 10."""

    layers: int | None = _opt(None, "fine-tune-layers")
    from_layer: str | None = _opt(None, "fine-tune-from")
    learning_rate: float | None = _opt(None, "fine-tune-lr")
    epochs: int = _opt(20, "fine-tune-epochs")
    patience: int = _opt(3, "fine-tune-patience")
    batch_size: int = _opt(32, "fine-tune-batch-size")
    augment: tuple[str, ...] = ()
    strategy: str | None = None


EXTRACT = ExtractRecipe()
HEAD = HeadRecipe()
FINE_TUNE = FineTuneRecipe()


def option(recipe: type, name: str) -> str:
    """The command-line flag of a recipe field: ``option(HeadRecipe, "learning_rate") == "--lr"``."""
    spec = {f.name: f for f in dataclasses.fields(recipe)}[name]
    return "--" + spec.metadata.get("option", name.replace("_", "-"))


def param(recipe: type, name: str) -> str:
    """The Typer parameter name of a recipe field (the flag without dashes, as a Python name)."""
    return option(recipe, name)[2:].replace("-", "_")


def from_options(recipe: type[R], params: dict, **overrides: Any) -> R:
    """A recipe from parsed command-line options (Typer's ``ctx.params``); fields absent there keep defaults."""
    values = {}
    for f in dataclasses.fields(recipe):
        key = param(recipe, f.name)
        if key in params and params[key] is not None:
            values[f.name] = params[key]
    return recipe(**{**values, **overrides})
