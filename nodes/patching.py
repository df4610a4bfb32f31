"""Quantize the layers of a loaded ComfyUI model on a clone, never on the input: the plan's driver for ModelPatchers.

ComfyUI caches node outputs and shares them between branches, so the input ModelPatcher and its modules stay
untouched: each quantized layer is a new FP8 module attached to the clone as an object patch, swapped in only
while the clone is loaded. The GPU therefore only ever receives the FP8 layer.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import comfy.utils
import torch

from ..quant.config import QuantConfig
from ..quant.decision import FP8, UNIT_SCALE
from ..quant.engine import run_plan
from ..quant.plan import make_plan
from ..quant.report import Report
from .common import progress_callback
from .fp8_ops import make_fp8_ops, ops_linear_holding
from .host_fp8 import fp8_weight, is_linear
from .runtime_patches import use_fp8_patcher


def _original_weight(patcher, key: str, module: torch.nn.Module) -> torch.Tensor:
    """The layer's own weight, without LoRA merged in by a patcher that is currently applied."""
    for candidate in (patcher, getattr(patcher, "parent", None)):
        backup = getattr(candidate, "backup", {})  # {} for None too
        if key in backup:
            return backup[key].weight
    return module.weight


def quantize_modules(patcher, root_attr: str, config: QuantConfig, *, text_encoders: Mapping[str, str] | None = None,
                     rule: str | None = None) -> tuple[object, Report]:
    """Clone `patcher` and attach an FP8 copy of each Linear the plan marks FP8 under `root_attr`.

    `root_attr` is the attribute path of the module tree inside patcher.model ("diffusion_model" for a MODEL, ""
    for a CLIP's cond_stage_model, whose chosen `text_encoders` are {encoder: name prefix}). Layers already in
    FP8 (ours, or the host's own) are passed through and reported. Honours ComfyUI's interrupt between tensors.
    """
    clone = patcher.clone()
    # The clone runs different modules for the same weight keys: a new uuid makes ComfyUI re-apply weight
    # patches (LoRA) to them instead of assuming the ones already applied for the input model still hold.
    clone.patches_uuid = uuid.uuid4()
    use_fp8_patcher(clone)
    root = comfy.utils.get_attr(patcher.model, root_attr) if root_attr else patcher.model
    prefix = f"{root_attr}." if root_attr else ""
    # clones share one module tree; get_model_object looks through an applied clone's object patches
    modules = ((n, patcher.get_model_object(f"{prefix}{n}")) for n, _ in root.named_modules() if n)
    linears = {n: m for n, m in modules if is_linear(m)}
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, module in linears.items():
        weight = _original_weight(patcher, f"{prefix}{name}.weight", module)
        arrived_fp8 = fp8_weight(module, name, weight)
        if arrived_fp8 is not None:  # ours, or the host's own FP8 layer (a stock loader on an FP8 file)
            weight, scales[f"{name}.weight"] = arrived_fp8
        tensors[f"{name}.weight"] = weight
    for name, _ in list(root.named_parameters()) + list(root.named_buffers()):  # biases, norms, tables, scales
        if name not in tensors:
            tensors[name] = patcher.get_model_object(f"{prefix}{name}")
    plan = make_plan(config, {k: tuple(t.shape) for k, t in tensors.items()}, {k: t.dtype for k, t in tensors.items()},
                     model_prefix=None if text_encoders is not None else "", text_encoders=text_encoders,
                     linears=set(linears))
    results, report = run_plan(plan, tensors, tensors.__getitem__, scales=scales, progress=progress_callback(),
                               report=plan.new_report(rule))
    ops = make_fp8_ops(config.compute)
    for key, result in results.items():
        if result.decision.action == FP8:
            bias = linears[result.decision.layer].bias
            clone.add_object_patch(f"{prefix}{result.decision.layer}", ops_linear_holding(
                ops, result.tensor, result.scale, bias, bias_dtype=tensors[key].dtype))
        elif result.decision.action == UNIT_SCALE and result.tensor is not tensors[key]:
            clone.add_object_patch(f"{prefix}{key}", result.tensor)
    return clone, report
