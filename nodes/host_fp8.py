"""FP8 weights as the host holds them: in our layers, and in ComfyUI's own (stock loaders on FP8 files).

Quantize Model, Save FP8 Model and their reports must see every FP8 layer of a model, whoever made it:
- ours (`FP8Ops.Linear`): a float8 `weight` and a float32 `weight_scale`, or the scale a LoRA-patched weight
  carries (`OWN_SCALE`);
- ComfyUI 0.8.0 mixed-precision layers (native files, and legacy scaled_fp8 files, which it converts): the
  `weight` is a comfy-kitchen `QuantizedTensor`; its FP8 layouts keep the float8 data in `_qdata` and the
  scale in `_params.scale`. Its other layouts (nvfp4, mxfp8, int8, ...) pack bytes this pack cannot read:
  they are refused, naming the layer and the layout;
- ComfyUI 0.3.75 mixed-precision layers: its own `QuantizedTensor` (`_qdata`, `_layout_params["scale"]`);
  its legacy `scaled_fp8_ops` layers: a float8 `weight` and a float32 `scale_weight`;
- a plain float8 weight with none of these (ComfyUI's `weight_dtype=fp8_e4m3fn` cast) has a scale of 1.0.
"""

from __future__ import annotations

import torch

from ..quant.formats import is_fp8

# A weight re-quantized under a patch (LoRA) carries its own scale as this attribute of its Parameter
# (nodes/fp8_ops.py): the layer's `weight_scale` belongs to the unpatched weight.
OWN_SCALE = "fp8_scale"

# comfy-kitchen / ComfyUI layout names whose data is float8 with one scale per tensor (or per channel)
FP8_LAYOUTS = ("TensorCoreFP8Layout", "TensorCoreFP8E4M3Layout", "TensorCoreFP8E5M2Layout")


class UnsupportedHostLayout(ValueError):
    """A layer the host holds in a quantized layout other than scaled FP8."""


def _layout_name(weight: torch.Tensor) -> str | None:
    """The host's layout name if `weight` is one of its quantized tensor types, else None."""
    for attr in ("_layout_cls", "_layout_type"):  # comfy-kitchen (0.8.0), ComfyUI 0.3.75
        name = getattr(weight, attr, None)
        if name is not None:
            return name if isinstance(name, str) else getattr(name, "__name__", str(name))
    return None


def fp8_weight(module: torch.nn.Module, name: str = "", weight: torch.Tensor | None = None) \
        -> tuple[torch.Tensor, torch.Tensor] | None:
    """(float8 data, float32 scale) of `module`'s weight (or of `weight`, read for that module) when it is FP8
    in any of the forms above; None when it is a plain 16/32-bit weight."""
    weight = module.weight if weight is None else weight
    scale = scale_of(weight, getattr(module, "weight_scale", None))  # read off the Parameter, before `.data`
    if isinstance(weight, torch.nn.Parameter):
        weight = weight.data
    layout = _layout_name(weight)
    if layout is not None:
        if layout not in FP8_LAYOUTS:
            raise UnsupportedHostLayout(f"{name or 'a layer'} is held by ComfyUI in its {layout} layout; this pack "
                                        "reads and writes scaled FP8 only. Load the model from a 16-bit file instead")
        params = getattr(weight, "_params", None)
        scale = params.scale if params is not None else weight._layout_params["scale"]
        if scale is None:
            scale = torch.ones((), device=weight._qdata.device)
        return weight._qdata, scale.detach().float()
    if not is_fp8(weight):
        return None
    if scale is None:
        scale = getattr(module, "scale_weight", None)  # ComfyUI's legacy scaled_fp8 ops
    if scale is None:
        scale = torch.ones((), device=weight.device)
    return weight, scale.detach().float()


def scale_of(weight: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """The scale `weight` carries (see OWN_SCALE), else `default`: the scale of the layer's unpatched weight."""
    own = getattr(weight, OWN_SCALE, None)
    return default if own is None else own


def is_linear(module: torch.nn.Module) -> bool:
    """A Linear layer, including ComfyUI 0.8.0's mixed-precision Linear (a plain Module, not an nn.Linear)."""
    return isinstance(module, torch.nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")
                                                   and isinstance(getattr(module, "weight", None), torch.Tensor))
