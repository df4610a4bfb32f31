"""Quantize the Linear layers of a loaded ComfyUI model on a clone, never on the input.

ComfyUI caches node outputs and shares them between branches, so the input
ModelPatcher and its modules stay untouched: each quantized layer is a new FP8
module attached to the clone as an object patch, swapped in only while the clone is
loaded. The GPU therefore only ever receives the FP8 layer.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import comfy.model_management
import comfy.utils
import torch

from ..quant.formats import quantize_weight_with_error
from ..quant.quantize import quantize_table
from ..quant.report import LayerReport, Report
from .fp8_ops import fp8_linear_from, make_fp8_ops
from .host_fp8 import fp8_weight, is_linear

# A layer's scales (ours, ComfyUI's mixed-precision and legacy names): their bytes count in the layer's row.
SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".scale_weight", ".scale_input")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _original_weight(patcher, key: str, module: torch.nn.Module) -> torch.Tensor:
    """The layer's own weight, without LoRA merged in by a patcher that is currently applied."""
    for candidate in (patcher, getattr(patcher, "parent", None)):
        backup = getattr(candidate, "backup", {}) if candidate is not None else {}
        if key in backup:
            return backup[key].weight
    return module.weight


def quantize_modules(
    patcher,
    root_attr: str,
    should_quantize: Callable[[str, tuple[int, ...]], bool],
    *,
    fp8_format: str,
    scaling: str,
    compute: str,
    report: Report,
    unit_scale: frozenset[str] = frozenset(),
) -> object:
    """Clone `patcher` and attach an FP8 copy of each selected Linear under `root_attr`.

    `root_attr` is the attribute path of the module tree inside patcher.model
    ("diffusion_model" for MODEL, "" for a CLIP's cond_stage_model). Layers already in
    FP8 are left as they are and reported. `unit_scale` names root tensors (pos_embed) stored in FP8 with
    scale 1.0, also as object patches. Honours ComfyUI's interrupt between layers.
    """
    clone = patcher.clone()
    # The clone runs different modules for the same weight keys: a new uuid makes ComfyUI re-apply weight
    # patches (LoRA) to them instead of assuming the ones already applied for the input model still hold.
    clone.patches_uuid = uuid.uuid4()
    root = comfy.utils.get_attr(patcher.model, root_attr) if root_attr else patcher.model
    prefix = f"{root_attr}." if root_attr else ""
    ops = make_fp8_ops(compute)
    # clones share one module tree; get_model_object looks through an applied clone's object patches
    modules = ((n, patcher.get_model_object(f"{prefix}{n}")) for n, _ in root.named_modules() if n)
    linears = [(n, m) for n, m in modules if is_linear(m)]
    progress = comfy.utils.ProgressBar(max(len(linears), 1))
    handled: set[int] = set()
    for index, (name, module) in enumerate(linears):
        comfy.model_management.throw_exception_if_processing_interrupted()
        weight = _original_weight(patcher, f"{prefix}{name}.weight", module)
        shape = tuple(weight.shape)
        handled.add(id(module.weight))
        held = fp8_weight(module, name, weight)
        if held is not None:  # ours, or the host's own FP8 layer (a stock loader on an FP8 file): passed through
            qdata, scale = held
            size = _nbytes(qdata) + _nbytes(scale)
            report.add(LayerReport(name, shape, str(qdata.dtype), str(qdata.dtype), size, size, None, "kept"))
        elif weight.dim() == 2 and should_quantize(name, shape):
            qweight, scale, err = quantize_weight_with_error(weight, fp8_format, scaling, name=name)
            layer = fp8_linear_from(ops, qweight, scale, module.bias, bias_dtype=weight.dtype)
            clone.add_object_patch(f"{prefix}{name}", layer)
            report.add(LayerReport(name, shape, str(weight.dtype), str(qweight.dtype), _nbytes(weight),
                                   _nbytes(qweight) + _nbytes(scale), err, "fp8"))
        else:
            report.add(LayerReport(name, shape, str(weight.dtype), str(weight.dtype), _nbytes(weight),
                                   _nbytes(weight), None, "protected"))
        progress.update_absolute(index + 1)
    for name in sorted(unit_scale):
        tensor = patcher.get_model_object(f"{prefix}{name}")
        if isinstance(tensor, torch.Tensor):
            handled.add(id(tensor))
            table = quantize_table(name, tensor, fp8_format, report)
            if table is not tensor:
                clone.add_object_patch(f"{prefix}{name}", table)
    for name, tensor in list(root.named_parameters()) + list(root.named_buffers()):
        if id(tensor) not in handled and not name.endswith(SCALE_SUFFIXES):
            report.add(LayerReport(name, tuple(tensor.shape), str(tensor.dtype), str(tensor.dtype),
                                   _nbytes(tensor), _nbytes(tensor), None, "kept"))
    if report.n_already_fp8:
        report.warnings.append(f"the input already holds {report.n_already_fp8} FP8 layer(s): they were kept as "
                               "they are")
    elif report.n_fp8 == 0:
        report.warnings.append("no layer was quantized: check protect_preset / protect_patterns")
    return clone
