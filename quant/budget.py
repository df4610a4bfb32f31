"""Fit a memory budget: which layers stay 16-bit so the weights fit and the predicted output error is smallest.

A layer's cost is the square of its own quantization error on its real weights (the report's rel_error,
measured while quantizing) times its group's sensitivity factor, measured by the benchmark and shipped in
sensitivity.json with where it came from. The predicted output error is the square root of the summed costs of
the layers in FP8. Keeping a layer 16-bit removes its cost and adds (16-bit bytes - FP8 bytes); the planner
takes layers by cost removed per byte added while they fit (greedy; `python -m bench.run --only budget` compares
it with the exact optimum). Layers the preset protects stay 16-bit unless the budget cannot be met otherwise;
layers the user's patterns protect always do.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .formats import quantize_weight_with_error

GIB = 1 << 30
BUDGET_FORMS = ("empty or off (no budget: the preset decides), auto (fit ComfyUI's device), or the diffusion "
                "model's weights in GiB, e.g. 10.5")
SENSITIVITY = json.loads((Path(__file__).with_name("sensitivity.json")).read_text())


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.2f} MiB"


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


def held_bytes(row, itemsize: int | None = None) -> int:
    """A report row's bytes as the host holds them: FP8 and non-float tensors as stored, the others at `itemsize`
    bytes per element (None: as stored)."""
    wide = row.dtype_after.startswith("torch.float") and "float8" not in row.dtype_after
    return math.prod(row.shape) * itemsize if wide and itemsize is not None else row.bytes_after


def fit_budget(plan, report, budget: int, source: Callable[[str], torch.Tensor], itemsize: int | None = None) -> dict:
    """Fit the diffusion model's weights in `budget` bytes after a first pass of `plan` filled `report`.

    `itemsize`: bytes per element of the model's 16-bit tensors where the host will hold them in another dtype
    than the source's (ComfyUI builds a model in float32 on the CPU); None: as they are.

    Returns {key: new Decision} for the tensors to redo (apply them to `source(key)`, the tensor as it came in);
    their old rows are dropped from the report, and the plan holds the new decisions. The report gets the
    budget's summary (`report.budget`) and a warning for preset-protected layers the budget put in FP8."""
    from .plan import FP8, PROTECTED, UNIT_SCALE, Decision

    rows = {row.name: row for row in report.layers}

    def wide(row) -> int:  # the row's bytes when held 16-bit
        return row.bytes_before if itemsize is None else math.prod(row.shape) * itemsize

    candidates, fixed = [], 0
    variant = plan.policy.variant.name
    for key, decision in plan.decisions.items():
        row = rows.get(decision.layer) if decision.in_model else None
        if row is None:
            continue
        if decision.action in (FP8, UNIT_SCALE) and row.action == "fp8":
            candidates.append(Candidate(key, decision.layer, row.bytes_after, wide(row), row.rel_error, False,
                                        group_factor(decision.layer, variant)[1]))
        elif decision.action == PROTECTED and decision.layer in plan.policy.by_preset:
            rows_out = row.shape[0] if plan.config.scaling == "per_channel" else 1
            candidates.append(Candidate(key, decision.layer, math.prod(row.shape) + 4 * rows_out, wide(row), None,
                                        True, group_factor(decision.layer, variant)[1]))
        else:
            fixed += held_bytes(row, itemsize)
    config = plan.config
    result = fit(candidates, fixed, budget,
                 lambda c: quantize_weight_with_error(source(c.key), config.fp8_format, config.scaling, name=c.name)[2])
    changed = {c.key: Decision(PROTECTED, "memory budget: kept 16-bit", c.name, True) if not c.preset else
               Decision(FP8, f"memory budget: FP8 to fit ({plan[c.key].rule} would keep it 16-bit)", c.name, True)
               for c in candidates if c.preset != (c.key in result.sixteen_bit)}
    plan.decisions.update(changed)
    names = {d.layer for d in changed.values()}
    report.layers = [row for row in report.layers if row.name not in names]
    report.budget = {"budget_bytes": budget, "bytes": result.bytes, "predicted_error": result.predicted_error,
                     "kept_16bit": sorted(c.name for c in candidates if not c.preset and c.key in result.sixteen_bit),
                     "demoted": result.demoted,
                     "sensitivity": f"{variant or 'no measured variant: largest'} factors; {SENSITIVITY['source']}"}
    if result.demoted:
        report.warnings.append(f"memory budget: {len(result.demoted)} layer(s) the preset keeps 16-bit are FP8 to fit "
                               f"({', '.join(result.demoted[:8])}{', ...' if len(result.demoted) > 8 else ''})")
    return changed
