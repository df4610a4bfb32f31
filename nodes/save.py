"""Save FP8 Model: write the FP8 diffusion model as a .safetensors stock ComfyUI loads.

Layout: ComfyUI's native mixed-precision format (`<layer>.weight` FP8, `<layer>.weight_scale`
float32, `_quantization_metadata` header), read by ComfyUI's own UNETLoader. Every FP8 layer of
the model is written, whoever made it: ours, or the host's own (a stock loader on an FP8 file,
see host_fp8.py). Written atomically under the output folder with a fresh counter: never overwrites.
"""

from __future__ import annotations

import json
import os

import comfy.model_management
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from ..quant.checkpoint import LAYOUTS, save_quantized, to_stock_layout
from ..quant.config import check_choice
from ..quant.formats import format_name, is_fp8
from ..quant.plan import SCALE_SUFFIXES
from ..quant.policy import UNIT_SCALE_TENSORS
from .common import CATEGORY, INFO_KEY, PACK_VERSION, PackNode
from .host_fp8 import fp8_weight, is_linear


def fp8_state_dict(model, layout: str = "stock_compatible") -> tuple[dict, dict[str, str], list[str]]:
    """The diffusion model's tensors in the native layout, with LoRA/patches merged as ComfyUI's ModelSave does."""
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    dm = model.model.diffusion_model
    sd: dict[str, torch.Tensor] = {}
    layer_formats: dict[str, str] = {}
    for module_name, module in dm.named_modules():
        prefix = f"{module_name}." if module_name else ""
        fp8 = fp8_weight(module, module_name) if is_linear(module) else None
        if fp8 is not None:
            qdata, scale = fp8
            sd[prefix + "weight"], sd[prefix + "weight_scale"] = qdata.detach().cpu(), scale.cpu()
            layer_formats[module_name] = format_name(qdata.dtype)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is None or (fp8 is not None and (name == "weight" or ("." + name).endswith(SCALE_SUFFIXES))):
                continue
            # 16-bit like the official files (--cpu upcasts on load); an unscaled float8 tensor (a legacy file's
            # bias, a cast model's norm) widens exactly; a unit-scale table (pos_embed) stays FP8
            tensor = tensor.detach().cpu()
            widen = tensor.dtype == torch.float32 or (is_fp8(tensor) and prefix + name not in UNIT_SCALE_TENSORS)
            sd[prefix + name] = tensor.to(torch.float16) if widen else tensor
    if layout == "stock_compatible":
        rewritten = to_stock_layout(sd, layer_formats)
        notes = [f"stock_compatible: per-tensor float8_e4m3fn ({rewritten} layer(s) re-scaled: rounded a second "
                 "time, ~1.4x their weight error; load with scaling=per_tensor and save to keep one rounding)"]
    else:
        notes = ["auto: kept the model's own scales"]
    return sd, layer_formats, notes


class SD35FP8SaveModel(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35FP8SaveModel",
            display_name="Save FP8 Model",
            category=f"{CATEGORY}/save",
            description="Saves the FP8 diffusion model to the output folder as a .safetensors in ComfyUI's native "
                        "quantized layout, loadable by stock ComfyUI's Load Diffusion Model (UNETLoader). Never "
                        "overwrites; a failed save leaves no partial file.",
            inputs=[
                io.Model.Input("model", tooltip="An FP8 model from the FP8 loaders or Quantize Model to FP8."),
                io.String.Input("filename_prefix", default="diffusion_models/sd35_fp8",
                                tooltip="Path under the output folder; a counter is appended."),
                io.Combo.Input("layout", options=sorted(LAYOUTS), default="stock_compatible",
                               optional=True,
                               tooltip="stock_compatible (default): one float8_e4m3fn scale per layer, the form every "
                                       "ComfyUI with mixed-precision support runs natively (0.8+ on FP8 GPUs "
                                       "included), at slightly higher error than per-channel. auto: keep the model's "
                                       "own scales (per-channel where it has them): read by this pack's loaders and "
                                       "ComfyUI 0.3.75; ComfyUI 0.8 reads them on CPUs and CUDA 12 builds only."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix, layout="stock_compatible") -> io.NodeOutput:
        check_choice("layout", layout, sorted(LAYOUTS))
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
        info = model.model_options.get(INFO_KEY, {})
        metadata = {
            "sd35_fp8.pack_version": PACK_VERSION,
            "sd35_fp8.layout": layout,
            "sd35_fp8.source": str(info.get("source", "unknown")),
            "sd35_fp8.rule": str(info.get("rule", "unknown")),
            "sd35_fp8.fp8_format": ",".join(sorted(set(layer_formats.values()))),
            "sd35_fp8.scaling": "per_tensor" if layout == "stock_compatible" else str(info.get("scaling", "unknown")),
            "sd35_fp8.notes": json.dumps(notes),
        }
        while os.path.exists(path := os.path.join(folder, f"{filename}_{counter:05}_.safetensors")):
            counter += 1
        save_quantized(path, sd, layer_formats, metadata=metadata, overwrite=False)
        text = f"saved {os.path.relpath(path, output_dir)}: {len(layer_formats)} FP8 layers; {'; '.join(notes)}"
        return io.NodeOutput(ui={"text": [text]})
