"""The recipes of ideal-image and adversarial: their defaults and checks (no numpy, no TensorFlow here).

The command line takes its option defaults from these, so `tlcli --help` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlcli.errors import UsageError

METHODS = ("gd", "fgsm", "pgd")


@dataclass(frozen=True)
class IdealRecipe:
    """Adam ascent in pixel levels: steps, step size, penalties and the per-step roll and zoom."""

    steps: int = 150
    lr: float = 4.0
    tv_weight: float = 0.4
    l2_weight: float = 0.0
    jitter: int = 8
    scale: float = 0.1
    seed: int = 0

    def check(self) -> IdealRecipe:
        """Refuse settings the ascent cannot run with; returns the recipe."""
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1, not {self.steps}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, not {self.lr:g}")
        if self.tv_weight < 0 or self.l2_weight < 0 or self.jitter < 0:
            raise UsageError("--tv-weight, --l2-weight and --jitter must not be negative")
        if not 0 <= self.scale < 0.5:
            raise UsageError(f"--scale is a fraction in [0, 0.5), not {self.scale:g}")
        return self


@dataclass(frozen=True)
class AttackRecipe:
    """An attack in pixel levels: method, L-inf budget, step size and count; gd's penalty and Adam rate."""

    method: str = "pgd"
    eps: float = 2.0
    step: float | None = None
    steps: int = 100
    l2_weight: float = 0.01
    learning_rate: float = 1.0
    random_start: bool = False
    seed: int = 0

    def check(self) -> AttackRecipe:
        """Refuse an unknown method or a budget, step or step count that cannot work, before any model is loaded."""
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}; use one of {', '.join(METHODS)}")
        if not self.eps > 0:
            raise UsageError(f"--eps must be greater than 0 pixel levels (0-255 scale), not {self.eps:g}")
        if self.step is not None and not self.step > 0:
            raise UsageError(f"--step must be greater than 0 pixel levels, not {self.step:g}")
        if self.steps < 1:
            raise UsageError("--steps must be at least 1")
        return self

    @property
    def step_size(self) -> float:
        """PGD's step: ``step`` when given, else eps/8 but at least a quarter level."""
        return self.step if self.step is not None else max(self.eps / 8, 0.25)

    @property
    def iterations(self) -> int:
        """FGSM takes one step; the others up to ``steps``."""
        return 1 if self.method == "fgsm" else self.steps


IDEAL = IdealRecipe()
ATTACK = AttackRecipe()
