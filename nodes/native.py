"""compute=comfyui_native: the loaders hand ComfyUI its own FP8 layout instead of this pack's FP8 Linear.

The plan (protection, memory budget, per-layer report) is the pack's as always; the state dict it produces is
given to ComfyUI in the form a stock loader reads from a file Save FP8 Model wrote (per-tensor float8_e4m3fn
`weight_scale` and a `_quantization_metadata` entry naming the FP8 layers, each marked for 16-bit matmul), so
ComfyUI builds the model with its mixed-precision ops (comfy.quant_ops; on ComfyUI 0.8 and an FP8 GPU,
comfy-kitchen's kernels). LoRAs, saving and offloading are then ComfyUI's own business for those layers. ComfyUI
0.8 or newer only (`host_runs_native`).
"""

from __future__ import annotations

import comfy.utils
import torch

from ..quant.checkpoint import QUANT_METADATA_KEY, STOCK_FORMAT, quantization_metadata, to_stock_layout
from .common import COMFYUI_NATIVE


def host_runs_native() -> bool:
    """ComfyUI 0.8's mixed-precision layers (a `comfy_quant` entry per layer, comfy-kitchen's kernels). 0.3.75 has
    an earlier form that, on an FP8 device, multiplies a layer it does not quantize as it is stored (a 16-bit weight
    against float32 activations on a CPU) and dequantizes to no dtype at all: it is handed nothing."""
    return hasattr(comfy.utils, "detect_layer_quantization")


def check_native_settings(settings: dict) -> None:
    """Refuse, naming the input and the fix, what ComfyUI's own FP8 layers cannot hold on every version and GPU."""
    if settings["compute"] != COMFYUI_NATIVE:
        return
    if not host_runs_native():
        raise ValueError(f"compute: {COMFYUI_NATIVE} needs ComfyUI 0.8 or newer (its mixed-precision FP8 layers); "
                         "update ComfyUI, or use compute=auto (this pack's own FP8 layers)")
    if settings["scaling"] != "per_tensor":
        raise ValueError(f"scaling: compute={COMFYUI_NATIVE} hands the layers to ComfyUI's own FP8 ops, which take one "
                         "scale per layer on every ComfyUI version and GPU build; set scaling to per_tensor")
    if settings["fp8_format"] != STOCK_FORMAT:
        raise ValueError(f"fp8_format: compute={COMFYUI_NATIVE} hands the layers to ComfyUI's own FP8 ops, which run "
                         f"{STOCK_FORMAT} on every version; set fp8_format to {STOCK_FORMAT}")


def native_state_dict(sd: dict[str, torch.Tensor], layer_formats: dict[str, str], model_prefix: str,
                      metadata: dict[str, str]) -> dict[str, str]:
    """Put `sd` (in place) in ComfyUI's native layout and return the header metadata that tells ComfyUI so.
    `layer_formats`: the quantizer's {model layer: FP8 format}. A layer that arrived per-channel (an FP8 file saved
    with layout=auto) is re-scaled to one scale: rounded a second time."""
    to_stock_layout(sd, layer_formats, model_prefix)
    return {**metadata, QUANT_METADATA_KEY: quantization_metadata(layer_formats, model_prefix)}
