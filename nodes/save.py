"""Save FP8 Model: write the FP8 diffusion model as a .safetensors stock ComfyUI loads.

Layout: ComfyUI's native mixed-precision format (`<layer>.weight` FP8, `<layer>.weight_scale`
float32, `_quantization_metadata` header), read by ComfyUI's own UNETLoader. Written
atomically under the output folder with a fresh counter: never overwrites.
"""

from __future__ import annotations

import json
import os

import comfy.model_management
import folder_paths
import torch

from ..quant.checkpoint import save_quantized
from ..quant.formats import dequantize_weight, format_name, quantize_weight
from .common import CATEGORY, INFO_KEY, PACK_VERSION


def fp8_state_dict(model, layout: str = "auto") -> tuple[dict, dict[str, str], list[str]]:
    """The diffusion model's tensors in the native layout, with LoRA/patches merged as ComfyUI's ModelSave does."""
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    dm = model.model.diffusion_model
    layer_formats = {name: format_name(m.weight.dtype) for name, m in dm.named_modules()
                     if getattr(m, "weight_scale", None) is not None}
    notes = []
    sd = {}
    for key, tensor in dm.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if tensor.dtype == torch.float32 and not key.endswith("weight_scale"):
            tensor = tensor.to(torch.float16)  # 16-bit like the official files; --cpu upcasts on load
        sd[key] = tensor
    if layout == "stock_compatible":
        rewritten = 0
        for layer, fmt in list(layer_formats.items()):
            scale = sd[f"{layer}.weight_scale"]
            if scale.numel() > 1 or fmt != "float8_e4m3fn":
                real = dequantize_weight(sd[f"{layer}.weight"], scale, torch.float32)
                sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"] = quantize_weight(real, "float8_e4m3fn",
                                                                                     "per_tensor", name=layer)
                layer_formats[layer] = "float8_e4m3fn"
                rewritten += 1
        notes.append(f"stock_compatible: {rewritten} layer(s) rewritten to per-tensor float8_e4m3fn")
    else:
        notes.append("auto: kept the model's own scales")
    return sd, layer_formats, notes


class SD35FP8SaveModel:
    TITLE = "Save FP8 Model"
    CATEGORY = f"{CATEGORY}/save"
    DESCRIPTION = ("Saves the FP8 diffusion model to the output folder as a .safetensors in ComfyUI's native "
                   "quantized layout, loadable by stock ComfyUI's Load Diffusion Model (UNETLoader). Never "
                   "overwrites; a failed save leaves no partial file.")
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An FP8 model from the FP8 loaders or Quantize Model to FP8."}),
                "filename_prefix": ("STRING", {"default": "diffusion_models/sd35_fp8",
                                               "tooltip": "Path under the output folder; a counter is appended."}),
            },
            "optional": {
                "layout": (["auto", "stock_compatible"], {
                    "default": "auto",
                    "tooltip": "auto: keep the model's scales (per-channel where it has them; read by ComfyUI 0.3.75 "
                               "and this pack). stock_compatible: rewrite to per-tensor float8_e4m3fn scales, the "
                               "form every ComfyUI with mixed-precision support reads, at slightly higher error.",
                }),
            },
        }

    def save(self, model, filename_prefix, layout="auto"):
        if layout not in ("auto", "stock_compatible"):
            raise ValueError(f"layout: {layout!r} is not one of ['auto', 'stock_compatible']")
        output_dir = folder_paths.get_output_directory()
        inside = os.path.abspath(output_dir)
        target = os.path.abspath(os.path.join(inside, os.path.normpath(filename_prefix)))
        if not filename_prefix.strip() or os.path.commonpath((inside, target)) != inside or target == inside:
            raise ValueError(f"filename_prefix: {filename_prefix!r} is not a file name inside the output folder; "
                             "use a relative path such as diffusion_models/sd35_fp8 (no '..', not absolute)")
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        sd, layer_formats, notes = fp8_state_dict(model, layout)
        if not layer_formats:
            raise ValueError("model: this model has no FP8 layers; quantize it first (Quantize Model to FP8) "
                             "or save it with ComfyUI's ModelSave")
        info = dict(model.model_options.get(INFO_KEY, {}))
        metadata = {
            "sd35_fp8.pack_version": PACK_VERSION,
            "sd35_fp8.layout": layout,
            "sd35_fp8.source": str(info.get("source", "unknown")),
            "sd35_fp8.rule": str(info.get("rule", "unknown")),
            "sd35_fp8.fp8_format": ",".join(sorted(set(layer_formats.values()))),
            "sd35_fp8.scaling": "per_tensor" if layout == "stock_compatible" else str(info.get("scaling", "unknown")),
            "sd35_fp8.notes": json.dumps(notes),
        }
        while True:
            path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
            if not os.path.exists(path):
                break
            counter += 1
        save_quantized(path, sd, layer_formats, metadata=metadata, overwrite=False)
        text = f"saved {os.path.relpath(path, output_dir)}: {len(layer_formats)} FP8 layers; {'; '.join(notes)}"
        return {"ui": {"text": [text]}}
