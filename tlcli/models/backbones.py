"""The registry of keras.applications backbones, and the one path that resolves their weights."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tlcli.errors import UsageError
from tlcli.store import files


@dataclass(frozen=True)
class Spec:
    """One keras.applications backbone: how to build it and what it expects."""

    name: str
    family: str
    constructor: str
    module: str
    size: int
    feature_dim: int
    params: int
    alphas: tuple[float, ...] = ()
    min_size: int = 32
    fixed_size: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def default_alpha(self) -> float | None:
        return 1.0 if self.alphas else None


def _s(name, family, ctor, module, size, dim, params, **kw) -> Spec:
    return Spec(name, family, ctor, module, size, dim, params, **kw)


_EFF = [
    (224, 1280, 4049571),
    (240, 1280, 6575239),
    (260, 1408, 7768569),
    (300, 1536, 10783535),
    (380, 1792, 17673823),
    (456, 2048, 28513527),
    (528, 2304, 40960143),
    (600, 2560, 64097687),
]
_EFF2 = [
    ("b0", 224, 1280, 5919312),
    ("b1", 240, 1280, 6931124),
    ("b2", 260, 1408, 8769374),
    ("b3", 300, 1536, 12930622),
    ("s", 384, 1280, 20331360),
    ("m", 480, 1280, 53150388),
    ("l", 480, 1280, 117746848),
]

SPECS: dict[str, Spec] = {
    s.name: s
    for s in [
        _s("vgg16", "VGG", "VGG16", "vgg16", 224, 512, 14714688),
        _s("vgg19", "VGG", "VGG19", "vgg19", 224, 512, 20024384),
        _s("resnet50", "ResNet", "ResNet50", "resnet", 224, 2048, 23587712),
        _s("resnet101", "ResNet", "ResNet101", "resnet", 224, 2048, 42658176),
        _s("resnet152", "ResNet", "ResNet152", "resnet", 224, 2048, 58370944),
        _s("resnet50v2", "ResNetV2", "ResNet50V2", "resnet_v2", 224, 2048, 23564800),
        _s("resnet101v2", "ResNetV2", "ResNet101V2", "resnet_v2", 224, 2048, 42626560),
        _s("resnet152v2", "ResNetV2", "ResNet152V2", "resnet_v2", 224, 2048, 58331648),
        _s("mobilenet", "MobileNet", "MobileNet", "mobilenet", 224, 1024, 3228864, alphas=(0.25, 0.5, 0.75, 1.0)),
        _s(
            "mobilenetv2",
            "MobileNetV2",
            "MobileNetV2",
            "mobilenet_v2",
            224,
            1280,
            2257984,
            alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
        ),
        _s("mobilenetv3small", "MobileNetV3", "MobileNetV3Small", "mobilenet_v3", 224, 576, 939120, alphas=(0.75, 1.0)),
        _s(
            "mobilenetv3large", "MobileNetV3", "MobileNetV3Large", "mobilenet_v3", 224, 960, 2996352, alphas=(0.75, 1.0)
        ),
        *[
            _s(f"efficientnetb{i}", "EfficientNet", f"EfficientNetB{i}", "efficientnet", sz, d, p)
            for i, (sz, d, p) in enumerate(_EFF)
        ],
        *[
            _s(f"efficientnetv2{k}", "EfficientNetV2", f"EfficientNetV2{k.upper()}", "efficientnet_v2", sz, d, p)
            for k, sz, d, p in _EFF2
        ],
        _s("densenet121", "DenseNet", "DenseNet121", "densenet", 224, 1024, 7037504),
        _s("densenet169", "DenseNet", "DenseNet169", "densenet", 224, 1664, 12642880),
        _s("densenet201", "DenseNet", "DenseNet201", "densenet", 224, 1920, 18321984),
        _s("inceptionv3", "Inception", "InceptionV3", "inception_v3", 299, 2048, 21802784, min_size=75),
        _s(
            "inceptionresnetv2",
            "Inception",
            "InceptionResNetV2",
            "inception_resnet_v2",
            299,
            1536,
            54336736,
            min_size=75,
        ),
        _s("xception", "Xception", "Xception", "xception", 299, 2048, 20861480, min_size=71),
        _s("nasnetmobile", "NASNet", "NASNetMobile", "nasnet", 224, 1056, 4269716, fixed_size=True),
        _s("convnexttiny", "ConvNeXt", "ConvNeXtTiny", "convnext", 224, 768, 27820128),
        _s("convnextsmall", "ConvNeXt", "ConvNeXtSmall", "convnext", 224, 768, 49454688),
        _s("convnextbase", "ConvNeXt", "ConvNeXtBase", "convnext", 224, 1024, 87566464),
        _s("convnextlarge", "ConvNeXt", "ConvNeXtLarge", "convnext", 224, 1536, 196230336),
        _s("convnextxlarge", "ConvNeXt", "ConvNeXtXLarge", "convnext", 224, 2048, 348147968),
    ]
}


def spec(name: str) -> Spec:
    """Look up a backbone by name (case and punctuation ignored); unknown names list close matches."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key in SPECS:
        return SPECS[key]
    import difflib

    close = difflib.get_close_matches(key, SPECS, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run 'tlcli backbones' for the list"
    raise UsageError(f"unknown backbone {name!r}{hint}")


def resolve_alpha(sp: Spec, alpha: float | None) -> float | None:
    """Check ``alpha`` against what the backbone supports; None means the backbone's default."""
    if alpha is None:
        return sp.default_alpha
    if not sp.alphas:
        raise UsageError(f"--alpha applies only to MobileNet backbones, not {sp.name}")
    if alpha not in sp.alphas:
        raise UsageError(f"{sp.name} has no alpha {alpha:g}; choose one of {', '.join(f'{a:g}' for a in sp.alphas)}")
    return alpha


def feature_dim(sp: Spec, alpha: float | None) -> int:
    """Length of the pooled feature vector for this backbone and width multiplier."""
    if sp.name == "mobilenet" and alpha:
        return int(1024 * alpha)
    if sp.family == "MobileNetV3" and alpha:
        return int(sp.feature_dim * alpha)
    if sp.name == "mobilenetv2" and alpha and alpha > 1.0:
        return int(1280 * alpha)
    return sp.feature_dim


def preprocess_fn(sp: Spec):
    """The backbone's own keras.applications preprocess_input."""
    return importlib.import_module(f"keras.applications.{sp.module}").preprocess_input


def keras_models_dir() -> Path:
    """Where Keras caches downloaded weights ($KERAS_HOME/models, default ~/.keras/models)."""
    from keras.src.backend import config

    return Path(os.path.expanduser(config.keras_home())) / "models"


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

NONE_WEIGHTS_SEED = 0
"""``--weights none`` initialises from this seed, so the extractor and the saved model agree."""


class WeightsUnavailable(UsageError):
    """ImageNet weights are neither in the Keras cache nor downloadable."""


@contextlib.contextmanager
def recording_get_file(record: list) -> Iterator[None]:
    """Record which weight file Keras resolves, and turn a failed download into a one-line usage error."""
    from keras.src.utils import file_utils

    original = file_utils.get_file

    def get_file(fname=None, origin=None, *args, **kwargs):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                path = original(fname, origin, *args, **kwargs)
        except Exception as exc:
            name = fname or (origin or "").rsplit("/", 1)[-1]
            partial = keras_models_dir() / name
            with contextlib.suppress(OSError):
                if partial.exists() and partial.stat().st_size == 0:
                    partial.unlink()
            raise WeightsUnavailable(
                f"ImageNet weights {name} are not cached and could not be downloaded ({type(exc).__name__}); "
                f"put {name} in {keras_models_dir()}/ (from {origin}) or pass --weights FILE or --weights none"
            ) from None
        record.append(path)
        return path

    file_utils.get_file = get_file
    try:
        yield
    finally:
        file_utils.get_file = original


def check_precision(precision: str) -> str:
    """A Keras dtype policy name tlcli accepts for --precision; usage error otherwise."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build layers under a Keras mixed-precision policy, restoring the previous global policy afterwards.

    Only the layers created inside take the policy (Keras stores it per layer), so a head or model
    built later in the same process stays float32.
    """
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(check_precision(precision))
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def weights_label(weights: str | None) -> str:
    """How ``--weights`` is recorded: 'imagenet', 'none' or the file's absolute path."""
    lowered = (weights or "none").lower()
    return lowered if lowered in ("imagenet", "none") else str(Path(weights).resolve())


@dataclass
class Backbone:
    """A built feature extractor: pixels already preprocessed in, pooled feature vector out."""

    spec: Spec
    model: object
    size: int
    alpha: float | None
    weights: str
    weights_sha256: str | None
    precision: str = "float32"
    weights_file: str | None = None

    @property
    def key(self) -> str:
        """Identity of the features it makes: changes whenever the vectors would."""
        alpha = f"-a{self.alpha:g}" if self.alpha is not None else ""
        tag = self.weights if self.weights in ("imagenet", "none") else "file"
        digest = f"-{self.weights_sha256[:12]}" if self.weights_sha256 else ""
        mixed = f"-{self.precision}" if self.precision != "float32" else ""
        return f"{self.spec.name}{alpha}-{self.size}-{tag}{digest}{mixed}"

    def describe(self) -> dict:
        return {
            "backbone": self.spec.name,
            "alpha": self.alpha,
            "input_size": self.size,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "feature_dim": int(self.model.output_shape[-1]),
            "precision": self.precision,
        }


def build(
    name: str,
    alpha: float | None = None,
    size: int | None = None,
    weights: str = "imagenet",
    include_top: bool = False,
    pooling: str | None = "avg",
    classifier_activation: str | None = "softmax",
    precision: str = "float32",
) -> Backbone:
    """Build a keras.applications backbone, resolving ``weights`` ('imagenet', 'none' or a file path).

    ``precision`` is the Keras dtype policy its layers compute in (weights stay float32).
    """
    sp = spec(name)
    alpha = resolve_alpha(sp, alpha)
    size = size or sp.size
    if size < sp.min_size:
        raise UsageError(f"{sp.name} needs an input size of at least {sp.min_size}, not {size}")
    if sp.fixed_size and size != sp.size and weights != "none":
        raise UsageError(f"{sp.name} with pre-trained weights only takes --size {sp.size}")
    import keras

    app = getattr(keras.applications, sp.constructor)
    kwargs: dict = {"include_top": include_top, "input_shape": (size, size, 3)}
    if include_top:
        kwargs["classifier_activation"] = classifier_activation
        if size != sp.size and weights != "none":
            raise UsageError(f"{sp.name} with its ImageNet top only takes its native input size {sp.size}")
    else:
        kwargs["pooling"] = pooling
    if alpha is not None:
        kwargs["alpha"] = alpha
    label = weights_label(weights)
    weights_arg = "imagenet" if label == "imagenet" else None
    if label not in ("imagenet", "none") and not os.path.isfile(weights):
        raise UsageError(f"weights file {weights} does not exist; pass a .h5/.weights.h5 file, 'imagenet' or 'none'")
    record: list = []
    import warnings

    try:
        with warnings.catch_warnings(), recording_get_file(record), dtype_policy(precision):
            warnings.simplefilter("ignore")
            if label == "none":
                import keras

                keras.utils.set_random_seed(NONE_WEIGHTS_SEED)
            model = app(weights=weights_arg, **kwargs)
            if label not in ("imagenet", "none"):
                model.load_weights(weights)
    except UsageError:
        raise
    except (ValueError, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if label not in ("imagenet", "none"):
            raise UsageError(
                f"weights file {weights} does not fit {sp.name} (include_top={include_top}): {first}"
            ) from None
        raise UsageError(f"cannot build {sp.name}: {first}") from None
    source = record[-1] if record else (label if label not in ("imagenet", "none") else None)
    return Backbone(sp, model, size, alpha, label, files.sha256(source) if source else None, precision, source)
