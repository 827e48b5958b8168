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

from tlcli.errors import UsageError

R = TypeVar("R")

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
AUGMENTATIONS = ("flip", "rotate", "zoom", "contrast")
STRATEGIES = ("mirrored", "multiworker")
DUPLICATE_SIMILARITY = 0.9
"""tlcli audit's cosine (of features less their mean) from which two photos are near-duplicates. On cats_vs_dogs
(MobileNet 0.25, 96-224 px) JPEG-70 copies scaled to 90% score 0.94-0.99, two different photos at most 0.80."""


MEASURED_SIZES: dict[tuple[str, float | None], int] = {("mobilenet", 0.25): 320}
"""Input sizes that beat the backbone's ImageNet size on cross-validated accuracy per cost, by (backbone, alpha).

MobileNet v1 0.25 (the ImageNet weights measured here, bench/bench_defaults.py), 10-fold cross-validated with
crop+pad views, 320 against 224: cats_vs_dogs 0.953 vs 0.952, flowers 0.830 vs 0.800, oxford_pets 0.750 vs
0.696, for about 1.5x the extract time; 416 was no better at 1.7x the cost. A larger test than training
resolution is a known effect (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"). Other
backbones keep their ImageNet size: their weights are not here to measure.
"""


def input_size(backbone: str, alpha: float | None, given: int | None, imagenet: int) -> tuple[int, str]:
    """The input size of an extract and where it comes from: ``given``, ``measured`` (``MEASURED_SIZES``) or
    ``imagenet`` (the backbone's own)."""
    if given:
        return given, "given"
    if (backbone, alpha) in MEASURED_SIZES:
        return MEASURED_SIZES[backbone, alpha], "measured"
    return imagenet, "imagenet"


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
    """The softmax head on stored features, shared by train-head, cross-validate and ``tlcli run``.

    meta.json records every field but ``refit`` and ``seed`` under ``head`` (the seed at the top level,
    the refit as the epochs it ran).
    """

    epochs: int = 600
    batch_size: int = 64
    learning_rate: float = _opt(1e-3, "lr")
    dropout: float = 0.5
    l2: float = 1e-3
    patience: int = 30
    refit: bool = True
    class_weights: bool = _opt(True, "balance")
    seed: int = 0


@dataclass(frozen=True)
class FineTuneRecipe:
    """What to unfreeze and how to train end to end; ``learning_rate`` None means the head's / 10, and neither
    ``layers`` nor ``from_layer`` means every layer of the backbone (BatchNormalization stays frozen).

    The defaults are the recipe measured on ten folds of cats_vs_dogs and three of oxford_pets
    (bench/README.md, Fine-tuning). Values no backbone could satisfy are refused on construction.
    """

    layers: int | None = _opt(None, "fine-tune-layers")
    from_layer: str | None = _opt(None, "fine-tune-from")
    learning_rate: float | None = _opt(None, "fine-tune-lr")
    epochs: int = _opt(20, "fine-tune-epochs")
    patience: int = _opt(3, "fine-tune-patience")
    batch_size: int = _opt(32, "fine-tune-batch-size")
    augment: tuple[str, ...] = ("flip", "zoom", "rotate")
    strategy: str | None = None

    def __post_init__(self) -> None:
        if self.layers is not None and self.from_layer is not None:
            raise UsageError("give --fine-tune-layers or --fine-tune-from, not both")
        if self.layers is not None and self.layers < 1:
            raise UsageError(f"--fine-tune-layers must be at least 1, not {self.layers}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UsageError(f"--fine-tune-lr must be above 0, not {self.learning_rate:g}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise UsageError("--fine-tune-epochs, --fine-tune-patience and --fine-tune-batch-size must be at least 1")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise UsageError(f"unknown --strategy {self.strategy!r}; use {' or '.join(STRATEGIES)}")

    def resolved(self, head: HeadRecipe) -> FineTuneRecipe:
        """This recipe with its learning rate settled: the given one, else the head's / 10."""
        return dataclasses.replace(self, learning_rate=self.learning_rate or head.learning_rate / 10)


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


def parse_augment(spec: str | None) -> tuple[str, ...]:
    """``flip,rotate,zoom,contrast`` (any subset, comma-separated; ``none`` or empty for no augmentation)."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return ()
    names = [s.strip().lower() for s in spec.split(",")]
    bad = [n for n in names if n not in AUGMENTATIONS]
    if bad or len(set(names)) != len(names):
        raise UsageError(
            f"unknown or repeated augmentation in --augment {spec!r}; use any of {','.join(AUGMENTATIONS)} or none"
        )
    return tuple(names)


def fine_tune_from_options(params: dict) -> FineTuneRecipe | None:
    """The fine-tuning recipe of parsed train-head options: None without ``--fine-tune``, a layer count or a layer.

    The other fine-tuning options only mean something with fine-tuning, so giving them alone is a usage error.
    """
    augment = params.get(param(FineTuneRecipe, "augment"))
    overrides = {"augment": parse_augment(augment)} if augment is not None else {}
    given = [
        f.name for f in dataclasses.fields(FineTuneRecipe) if params.get(param(FineTuneRecipe, f.name)) is not None
    ]
    if "layers" not in given and "from_layer" not in given and not params.get("fine_tune"):
        if given:
            flags = ", ".join(option(FineTuneRecipe, name) for name in given)
            raise UsageError(f"{flags} only take effect with fine-tuning; add --fine-tune")
        return None
    return from_options(FineTuneRecipe, params, **overrides)
