"""QuantConfig: every choice a quantization run takes, validated once.

Frozen so one config can be shared between loads without leaking state
(a per-model setting never lives on a shared class).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from .formats import FP8_DTYPES, SCALINGS
from .presets import PRESETS

COMPUTE_MODES: tuple[str, ...] = ("auto", "fp8_matmul", "weight_only")
BACKENDS: tuple[str, ...] = ("native", "quanto")


def check_choice(field_name: str, value: str, choices: Collection[str]) -> None:
    if value not in choices:
        raise ValueError(f"{field_name}: {value!r} is not one of {list(choices)}")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. Field names match the node inputs."""

    fp8_format: str = "float8_e4m3fn"
    scaling: str = "per_channel"
    protect_preset: str = "auto"
    protect_patterns: tuple[str, ...] = field(default_factory=tuple)
    compute: str = "auto"
    backend: str = "native"
    memory_budget: int | None = None  # bytes for the diffusion model's weights (quant.budget); None: the preset decides

    def __post_init__(self) -> None:
        check_choice("fp8_format", self.fp8_format, FP8_DTYPES)
        check_choice("scaling", self.scaling, SCALINGS)
        check_choice("protect_preset", self.protect_preset, PRESETS)
        check_choice("compute", self.compute, COMPUTE_MODES)
        check_choice("backend", self.backend, BACKENDS)
        if self.memory_budget is not None and (not isinstance(self.memory_budget, int) or self.memory_budget <= 0):
            raise ValueError(f"memory_budget: {self.memory_budget!r} is not a number of bytes above 0")
        if self.memory_budget is not None and self.backend != "native":
            raise ValueError("memory_budget: fitting a budget works with backend native only")
        patterns = self.protect_patterns
        object.__setattr__(self, "protect_patterns",
                           tuple(patterns.splitlines() if isinstance(patterns, str) else patterns))
