"""Quantize a torch module: each Linear the plan marks FP8 becomes an FP8Linear (native) or a quanto qfloat8 layer.

Both backends also store the plan's unit-scale tables (an SD3 MMDiT's `pos_embed`) in FP8; the model's own
forward casts them (ComfyUI's MMDiT does: `cast_to_input`). The input module is left untouched unless
`inplace=True` (a deep copy is quantized).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from .config import QuantConfig
from .decision import FP8, UNIT_SCALE
from .engine import run_plan
from .linear import FP8Linear
from .plan import make_plan
from .policy import ProtectionPolicy
from .quanto_backend import quantize_quanto
from .report import Report


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (works on meta-device modules)."""
    return dict(list(module.named_parameters()) + list(module.named_buffers()))


def _set(root: torch.nn.Module, name: str, new: torch.nn.Module | torch.Tensor) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(new, torch.Tensor) and attr in parent._parameters:
        new = torch.nn.Parameter(new, requires_grad=False)
    setattr(parent, attr, new)


def quantize(module: torch.nn.Module, config: QuantConfig | None = None, policy: ProtectionPolicy | None = None,
             inplace: bool = False, hint: str = "", budget_itemsize: int | None = None,
             text_encoders: Mapping[str, str] | None = None) -> tuple[torch.nn.Module, Report]:
    """FP8 copy of `module` (or `module` itself with inplace=True) and the report of what was done.
    `budget_itemsize`: bytes per element a memory budget counts the 16-bit tensors at (None: as they are).
    `text_encoders`: the module is text encoders, {encoder: name prefix} (e.g. {"t5xxl": ""} for a T5-XXL), planned
    by the text-encoder policy instead of the diffusion model's."""
    config = config or QuantConfig()
    target = module if inplace else copy.deepcopy(module)
    tensors = module_tensors(target)  # as planned, and the sources a memory budget redoes layers from
    linears = {n for n, m in target.named_modules() if isinstance(m, torch.nn.Linear)}
    plan = make_plan(config, {k: tuple(t.shape) for k, t in tensors.items()}, {k: t.dtype for k, t in tensors.items()},
                     linears=linears, hint=hint, policy=policy, text_encoders=text_encoders,
                     model_prefix="" if text_encoders is None else None)
    report = plan.new_report()
    skip: set[str] = set()
    if config.backend == "quanto":
        skip = quantize_quanto(target, {plan[k].layer: k for k in plan.keys(FP8)}, config, report)
    results, report = run_plan(plan, [k for k in tensors if k not in skip], lambda key: tensors[key].detach(),
                               itemsize=budget_itemsize, report=report)
    for key, result in results.items():
        if result.decision.action == FP8:
            bias = target.get_submodule(result.decision.layer).bias
            _set(target, result.decision.layer, FP8Linear(result.tensor, result.scale, bias, config.compute))
        elif result.decision.action == UNIT_SCALE:
            _set(target, key, result.tensor)
    return target, report
