"""Section 8, memory budget: the planner against fixed protection presets at the same bytes, and greedy against the
exact optimum.

For Large and Medium (full width, reduced depth; Student-t weights, a batch at timesteps 900..100): budgets from
all-FP8 to all-16-bit in steps, each with its bytes (16-bit tensors counted at 2 bytes, as a GPU holds them), the
planner's predicted error and the measured relative output error vs fp32. Fixed presets (the SD3.5 preset, none,
the preset plus a whole group kept 16-bit, and plus the image stream's adaLN or attention, the mixes section 6's
per-stream table suggests) are measured the same way, and the planner again at each preset's
bytes; the goal compares each preset with the planner's worst error at its bytes or more (more memory must never
cost accuracy). Greedy vs exact: on the full-size layer lists (each layer's error its group's mean measured here),
the greedy choice's predicted error over the optimum of the same 0/1 knapsack (64 KiB units).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from sd35_fp8.quant import plan as engine_plan
from sd35_fp8.quant.budget import Candidate, fit, group_factor, held_bytes
from sd35_fp8.quant.config import QuantConfig
from sd35_fp8.quant.decision import STORED_FP8
from sd35_fp8.quant.quantize import quantize

from . import models
from .common import RESULTS, log, rel_err

PRESETS = {
    "none (all FP8)": dict(protect_preset="none"),
    "SD3.5 preset": {},
    "preset + adaLN 16-bit": dict(protect_patterns="joint_blocks.*.adaLN_modulation.1"),
    "preset + attention 16-bit": dict(protect_patterns="joint_blocks.*.attn*.qkv\njoint_blocks.*.attn*.proj"),
    "preset + MLP 16-bit": dict(protect_patterns="joint_blocks.*.mlp.*"),
    "preset + image-stream adaLN 16-bit": dict(protect_patterns="joint_blocks.*.x_block.adaLN_modulation.1"),
    "preset + image-stream attention 16-bit": dict(
        protect_patterns="joint_blocks.*.x_block.attn*.qkv\njoint_blocks.*.x_block.attn*.proj"),
    "preset + first/last block 16-bit": dict(protect_patterns="joint_blocks.0.*\njoint_blocks.{last}.*"),
}
UNIT = 64 << 10


@contextlib.contextmanager
def _each_tensor_quantized_once():
    """The points differ only in which layers stay 16-bit: each tensor's FP8 copy (and its error) is the same in
    all of them, so it is computed once (the math is deterministic; the drivers and the planner run as they are)."""
    names = [(engine_plan, "quantize_weight_with_error"), (engine_plan, "quantize_unit_scale")]
    saved = [getattr(module, name) for module, name in names]
    cache: dict = {}

    def memo(fn):
        @functools.wraps(fn)
        def wrapper(tensor, *args, **kwargs):
            key = (fn.__name__, tensor.data_ptr(), tuple(tensor.shape), args, tuple(sorted(kwargs.items())))
            if key not in cache:
                cache[key] = fn(tensor, *args, **kwargs)
            return cache[key]

        return wrapper

    for (module, name), fn in zip(names, saved):
        setattr(module, name, memo(fn))
    try:
        yield
    finally:
        for (module, name), fn in zip(names, saved):
            setattr(module, name, fn)


def _run(ref, inp, reference, budget: int | None = None, **settings) -> dict:
    config = QuantConfig(compute="weight_only", memory_budget=budget, **settings)
    model, report = quantize(models.sharing_copy(ref), config, inplace=True, budget_itemsize=2)
    held = sum(held_bytes(row, 2) for row in report.layers)
    return {"bytes": held, "measured": rel_err(reference, models.forward(model, inp)),
            "predicted": None if report.budget is None else report.budget["predicted_error"],
            "errors": {row.name: row.rel_error for row in report.layers if row.action in STORED_FP8}}


def _variant(variant: str, depth: int, pixels: int, steps: int) -> dict:
    ref = models.reference(variant, depth, "student_t")
    inp = models.inputs(pixels, seed=5, batch=4)
    reference = models.forward(ref, inp)
    presets = {name: _run(ref, inp, reference, **{k: v.format(last=depth - 1) for k, v in s.items()})
               for name, s in PRESETS.items()}
    sixteen = sum(t.numel() * 2 for t in list(ref.parameters()) + list(ref.buffers()))
    low = presets["none (all FP8)"]["bytes"]
    budgets = sorted({low + (sixteen - low) * i // (steps - 1) for i in range(steps)} |
                     {p["bytes"] for p in presets.values()})
    planner = []
    for budget in budgets:
        point = _run(ref, inp, reference, budget)
        planner.append({"budget": budget, **{k: point[k] for k in ("bytes", "measured", "predicted")}})
        log(f"budget {variant}: {budget / sixteen:.3f} of 16-bit -> error {point['measured']:.4f}")
    at = {p["budget"]: p for p in planner}
    versus = {name: {"bytes": p["bytes"], "measured": p["measured"], "planner_measured": at[p["bytes"]]["measured"],
                     "planner_worst_at_or_above": max(q["measured"] for q in planner if q["budget"] >= p["bytes"])}
              for name, p in presets.items()}
    group_errors = defaultdict(list)
    for name, err in presets["none (all FP8)"]["errors"].items():
        group_errors[group_factor(name, variant)[0]].append(err)
    return {"depth": depth, "pixels": pixels, "sixteen_bit_bytes": sixteen, "planner": planner, "presets": versus,
            "group_weight_err": {g: float(np.mean(e)) for g, e in group_errors.items()},
            "planner_over_preset_max": max(v["planner_worst_at_or_above"] / v["measured"] for v in versus.values()
                                           if v["measured"] > 0)}


def _candidates(variant: str, group_err: dict[str, float]) -> tuple[list[Candidate], int]:
    """Full-size layer list: every Linear and pos_embed a candidate (no preset), the rest fixed at 16-bit."""
    candidates, fixed = [], 0
    for name, tensor in list(models.meta_model(variant).named_parameters()) + \
            list(models.meta_model(variant).named_buffers()):
        layer = name.removesuffix(".weight")
        group, factor = group_factor(layer, variant)
        if (tensor.dim() == 2 and name.endswith(".weight") and group in group_err) or name == "pos_embed":
            n = tensor.numel()
            candidates.append(Candidate(name, layer, n + 4 * (tensor.shape[0] if tensor.dim() == 2 else 0), 2 * n,
                                        group_err.get(group, 0.018), False, factor))
        else:
            fixed += 2 * tensor.numel()
    return candidates, fixed


def _optimum(candidates: list[Candidate], spare: int) -> float:
    """Smallest predicted error with at most `spare` extra bytes: 0/1 knapsack maximising the cost removed."""
    capacity = spare // UNIT
    best = np.zeros(capacity + 1)
    for c in candidates:
        w = math.ceil(c.extra_bytes / UNIT)
        if w <= capacity:
            best[w:] = np.maximum(best[w:], best[:-w] + c.cost())
    return math.sqrt(max(sum(c.cost() for c in candidates) - best[-1], 0.0))


def _greedy_vs_optimum(variant: str, group_err: dict[str, float], steps: int) -> list[dict]:
    candidates, fixed = _candidates(variant, group_err)
    low = fixed + sum(c.bytes_fp8 for c in candidates)
    high = fixed + sum(c.bytes_16 for c in candidates)
    rows = []
    for i in range(1, steps - 1):
        budget = low + (high - low) * i // (steps - 1)
        greedy = fit(candidates, fixed, budget, lambda c: c.weight_err).predicted_error
        optimum = _optimum(candidates, budget - low)
        rows.append({"budget_gib": budget / 2**30, "greedy": greedy, "optimum": optimum,
                     "ratio": greedy / optimum if optimum else 1.0})
    return rows


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (variant, r) in zip(axes[0], results.items()):
        full = r["sixteen_bit_bytes"]
        xs = [p["bytes"] / full for p in r["planner"]]
        ax.plot(xs, [p["measured"] for p in r["planner"]], "o-", label="planner, measured")
        ax.plot(xs, [p["predicted"] for p in r["planner"]], "--", color="gray", label="planner, predicted")
        for name, p in r["presets"].items():
            ax.plot(p["bytes"] / full, p["measured"], "s", label=name)
        ax.set(title=f"{variant} (depth {r['depth']}, full width)", xlabel="weight bytes / 16-bit bytes",
               ylabel="output rel. error vs fp32")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False) -> dict:
    depth, pixels, steps = (1, 128, 4) if quick else (3, 384, 7)
    results = {}
    for variant in ("sd35_medium", "sd35_large"):
        with _each_tensor_quantized_once():
            results[variant] = _variant(variant, depth, pixels, steps)
    greedy = {v: _greedy_vs_optimum(v, r["group_weight_err"], 12) for v, r in results.items()}
    plot = RESULTS / ("budget-quick.png" if quick else "budget.png")  # a quick run leaves bench/README.md's plot alone
    _plot(results, plot)
    return {**results, "greedy_vs_optimum": greedy, "plot": str(plot.relative_to(RESULTS.parent.parent)),
            "planner_over_preset_max": max(r["planner_over_preset_max"] for r in results.values()),
            "greedy_over_optimum_max": max(row["ratio"] for rows in greedy.values() for row in rows)}
