"""Fit a memory budget: which layers stay 16-bit so the weights fit and the predicted output error is smallest.

A layer's cost is the square of its own quantization error on its real weights (the report's rel_error,
measured while quantizing) times its group's sensitivity factor, measured by the benchmark and shipped in
sensitivity.json with where it came from. The predicted output error is the square root of the summed costs of
the layers in FP8. Keeping a layer 16-bit removes its cost and adds (16-bit bytes - FP8 bytes); the planner
takes layers by cost removed per byte added while they fit (greedy; `python -m bench.run --only budget` compares
it with the exact optimum). Layers the preset protects stay 16-bit unless the budget cannot be met otherwise;
layers the user's patterns protect always do.

The number work only: the plan turns its decisions and a report into candidates and back (`Plan.fit_budget`).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .report import GIB, LayerReport, format_bytes

BUDGET_FORMS = ("empty or off (no budget: the preset decides), auto (fit ComfyUI's device), or the diffusion "
                "model's weights in GiB, e.g. 10.5")
SENSITIVITY = json.loads((Path(__file__).with_name("sensitivity.json")).read_text())


class BudgetTooSmall(ValueError):
    """Even with every candidate layer in FP8 the weights exceed the budget."""


def parse_budget(text: str | None, input_name: str = "memory_budget") -> str | int | None:
    """None (off), "auto", or a number of bytes. Anything else is an error naming the input and the forms."""
    value = (text or "").strip().lower()
    if value in ("", "off"):
        return None
    if value == "auto":
        return "auto"
    try:
        gib = float(value.removesuffix("gib").removesuffix("gb").strip())
    except ValueError:
        gib = math.nan
    if not math.isfinite(gib) or gib <= 0:
        raise ValueError(f"{input_name}: {text!r} is not a memory budget; use {BUDGET_FORMS}")
    return int(gib * GIB)


SAMPLING_LATENT = (2, 16, 128, 128)  # SD3.5 at 1024x1024 with cfg: cond + uncond, 16 channels, 1/8 scale
SD3_MEMORY_USAGE_FACTOR = 1.6  # ComfyUI 0.8's for SD3 (0.3.75's is 1.2: the estimate below is the larger)


def sampling_bytes(on_gpu: bool) -> int:
    """What sampling SD3.5 at 1024x1024 with cfg needs by ComfyUI 0.8's own estimate (`BaseModel.memory_required`
    on SAMPLING_LATENT): latent area x 2 bytes (16-bit) x 0.01 x the factor MiB with a GPU's flash / PyTorch
    attention (about 1 GiB), area x 0.15 x the factor MiB otherwise, e.g. on the CPU (about 7.7 GiB). The nodes ask
    the running ComfyUI for its estimate; the CLI, which has none to ask, uses this."""
    area = SAMPLING_LATENT[0] * math.prod(SAMPLING_LATENT[2:])
    per_area = 2 * 0.01 if on_gpu else 0.15
    return int(area * per_area * SD3_MEMORY_USAGE_FACTOR * 2**20)


def auto_budget(free: int, sampling: int, where: str) -> int:
    """The weights' share of `free` bytes on `where` after sampling's `sampling` bytes and a margin of 5% (at least
    512 MiB) for the VAE decode and the allocator."""
    margin = max(free // 20, GIB // 2)
    budget = free - sampling - margin
    if budget <= 0:
        raise ValueError(f"memory_budget: auto: {where} has {format_bytes(free)} free and sampling at 1024x1024 needs "
                         f"{format_bytes(sampling)} plus a margin of {format_bytes(margin)}: nothing is left for the "
                         f"weights. Use {BUDGET_FORMS}")
    return budget


# Factors per variant as measured; Large Turbo has Large's shapes; a model of no measured variant gets the largest
# factor of each group (cautious).
_TABLES = SENSITIVITY["factors"]
_VARIANT_TABLE = {"sd35_large_turbo": "sd35_large"}
_CAUTIOUS = {g: max(t[g] for t in _TABLES.values()) for g in SENSITIVITY["globs"]}


def group_factor(name: str, variant: str | None) -> tuple[str, float]:
    """(sensitivity group, factor) of a layer of a model of `variant`; layers in no measured group get the table's
    largest factor (cautious)."""
    table = _TABLES.get(_VARIANT_TABLE.get(variant, variant), _CAUTIOUS)
    for group, globs in SENSITIVITY["globs"].items():
        if any(fnmatch.fnmatchcase(name, glob) for glob in globs):
            return group, table[group]
    return "unmeasured", max(table.values())


@dataclass
class Candidate:
    key: str
    name: str
    bytes_fp8: int
    bytes_16: int
    weight_err: float | None  # None: not quantized yet (a preset-protected layer), measured if needed
    preset: bool  # the preset keeps it 16-bit
    factor: float  # its group's sensitivity factor (group_factor)

    @property
    def extra_bytes(self) -> int:
        return max(self.bytes_16 - self.bytes_fp8, 1)

    def cost(self) -> float:
        return self.factor * (self.weight_err or 0.0) ** 2


@dataclass
class Fit:
    sixteen_bit: set[str]  # candidate keys kept 16-bit
    bytes: int
    predicted_error: float
    demoted: list[str]  # preset-protected layers put in FP8 to fit


def fit(candidates: list[Candidate], fixed_bytes: int, budget: int,
        measure: Callable[[Candidate], float]) -> Fit:
    """Choose the 16-bit set. `fixed_bytes`: everything that is not a candidate; `measure`: a preset-protected
    candidate's FP8 error, asked only when the budget forces it into FP8."""
    minimum = fixed_bytes + sum(c.bytes_fp8 for c in candidates)
    if minimum > budget:
        raise BudgetTooSmall(f"memory_budget: {format_bytes(budget)} is below the smallest this model reaches, "
                             f"{format_bytes(minimum)} with every layer the rules allow in FP8. Raise the budget, use "
                             "SD3.5 Medium, or set memory_budget off and let ComfyUI offload (e.g. --lowvram)")
    sixteen = {c.key for c in candidates if c.preset}
    total = fixed_bytes + sum(c.bytes_16 if c.key in sixteen else c.bytes_fp8 for c in candidates)
    demoted = []
    if total > budget:  # preset layers into FP8, the cheapest in error per byte saved first
        for c in [c for c in candidates if c.preset]:
            c.weight_err = measure(c)
        for c in sorted((c for c in candidates if c.preset), key=lambda c: c.cost() / c.extra_bytes):
            sixteen.discard(c.key)
            demoted.append(c.name)
            total -= c.extra_bytes
            if total <= budget:
                break
    else:  # spare bytes: 16-bit where it removes the most error per byte, while it fits
        for c in sorted((c for c in candidates if not c.preset), key=lambda c: -c.cost() / c.extra_bytes):
            if total + c.extra_bytes <= budget:
                sixteen.add(c.key)
                total += c.extra_bytes
    error = math.sqrt(sum(c.cost() for c in candidates if c.key not in sixteen))
    return Fit(sixteen, total, error, demoted)


def held_bytes(row: LayerReport, itemsize: int | None = None) -> int:
    """A report row's bytes as the host holds them: FP8 and non-float tensors as stored, the others at `itemsize`
    bytes per element (None: as stored)."""
    wide = row.dtype_after.startswith("torch.float") and "float8" not in row.dtype_after
    return math.prod(row.shape) * itemsize if wide and itemsize is not None else row.bytes_after
