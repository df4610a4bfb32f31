"""The one loop every driver runs: carry out a plan over the tensors handed in, fit a memory budget, return what
to store.

The drivers (streaming.py for files and state dicts, quantize.py for torch modules, the pack's nodes/patching.py
for ComfyUI models) only fetch tensors and build their output from the results: a layer a memory budget redoes
arrives once, with its final decision, so no driver has a "kept 16-bit after all" case of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from .decision import COMPANION, Decision
from .plan import Plan, apply
from .report import Report


@dataclass(frozen=True)
class Stored:
    """A tensor's final decision and what to store for it: the tensor, and a float32 scale for an FP8 layer."""

    decision: Decision
    tensor: torch.Tensor
    scale: torch.Tensor | None


def run_plan(plan: Plan, keys: Iterable[str], take: Callable[[str], torch.Tensor], *,
             source: Callable[[str], torch.Tensor] | None = None, scales: Mapping[str, torch.Tensor] | None = None,
             own: Callable[[torch.Tensor], torch.Tensor] | None = None,
             progress: Callable[[int, int], None] | None = None, itemsize: int | None = None,
             report: Report | None = None) -> tuple[dict[str, Stored], Report]:
    """Carry out `plan` for `keys` (in this order; companions are skipped: they travel with their layer).

    `take(key)`: each tensor, once. `source(key)`: a tensor again, as it came in, for the layers a memory budget
    redoes (default `take`). `scales`: the own scales of the layers that arrived in FP8, by weight key. `own`: makes
    a stored tensor safe to keep once the next is taken (a file reader copies a tensor out of its mapped pages).
    `progress(done, total)` after each tensor. `itemsize`: bytes per element the budget counts 16-bit tensors at
    (None: as they are). `report`: one to add the rows to (default `plan.new_report()`).

    Returns ({key: Stored} in `keys` order, the finished report)."""
    keys = [k for k in keys if plan[k].action != COMPANION]
    report = plan.new_report() if report is None else report
    scales = scales or {}
    results: dict[str, Stored] = {}

    def store(key: str, tensor: torch.Tensor) -> None:
        decision = plan[key]
        stored, scale = apply(decision, tensor, plan.config, report, scales.get(key))
        results[key] = Stored(decision, stored if own is None else own(stored), scale)

    for index, key in enumerate(keys):
        store(key, take(key))
        if progress is not None:
            progress(index + 1, len(keys))
    source = source or take
    for key in plan.fit_budget(report, source, itemsize):
        store(key, source(key))
    return results, plan.finish(report)
