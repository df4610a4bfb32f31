"""Load SD3.5 Checkpoint (FP8) / Load SD3.5 Diffusion Model (FP8).

Files are found only through folder_paths (no path joins of user strings), must be
.safetensors (pickle files are refused unread), and are quantized while they are
read, tensor by tensor, so the 16-bit diffusion model is never held in memory whole.
ComfyUI's own loaders then build the model, with our FP8 Linear as its operations (or, with
compute=comfyui_native, with ComfyUI's own FP8 layers: native.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from ..quant.budget import parse_budget
from ..quant.checkpoint import FREE_MEMORY, QUANT_METADATA_KEY, header_shapes_dtypes, reading, refuse_pickle
from ..quant.config import QuantConfig
from ..quant.plan import CHECKPOINT_MODEL_PREFIX, LOADER_TEXT_ENCODER_CHOICES
from ..quant.streaming import quantize_safetensors_stream, quantize_state_dict
from .budget import memory_budget_input, resolve_budget
from .common import (
    CATEGORY,
    COMFYUI_NATIVE,
    PackNode,
    progress_callback,
    protect_patterns_input,
    quant_inputs,
    record_info,
)
from .fp8_ops import FLOAT8_DTYPES, check_compute_supported, make_fp8_ops
from .fp8_tables import fp8_tables_in_place
from .native import check_native_settings, native_state_dict
from .runtime_patches import use_fp8_patcher

# What a loader's out-of-memory error says to do (quant.checkpoint.reading), by how it reads the file.
NEED_LESS = f"{FREE_MEMORY}. To need less: memory_budget smaller, or off (it keeps fewer layers 16-bit)"
CHECKPOINT_NEEDS_LESS = f"{NEED_LESS}; text_encoder_fp8=all (CLIP-L/G in FP8 too)"
UNQUANTIZED_NEEDS_MORE = (f"{FREE_MEMORY}. fp8_format=disabled loads the checkpoint as stored (16-bit): an fp8_format "
                          "loads it in about half the memory")
DIFFUSERS_NEEDS_MORE = (f"{FREE_MEMORY}. A diffusers folder is read whole in 16-bit before it is quantized: a single "
                        ".safetensors file of the model in models/diffusion_models is quantized while it is read and "
                        "needs about half the memory")


class MissingTextEncoders:
    """Stands in for CLIP when a checkpoint has no text encoders: any use says what to do instead."""

    MESSAGE = ("This checkpoint has no text encoders. Load them with a TripleCLIPLoader (clip_l, clip_g, t5xxl; "
               "type sd3) and connect its CLIP output instead of this loader's.")

    def __getattr__(self, name):
        raise RuntimeError(self.MESSAGE)


def _metadata(header: dict) -> dict[str, str]:
    """Header metadata for ComfyUI's model detection, minus the quantization entry: our operations read the
    FP8 layers themselves (ComfyUI would otherwise switch to its own mixed-precision ops)."""
    return {k: v for k, v in (header.get("__metadata__") or {}).items() if k != QUANT_METADATA_KEY}


def _model_file(folder: str, name: str, input_name: str) -> tuple[str, dict]:
    """(full path, checked header) of a listed model file, resolved only through folder_paths (which keeps it
    inside the model folders) and checked once to be a readable .safetensors file: pickles are refused unread."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"{input_name}: {name} is not in models/{folder} any more (deleted, moved, or a "
                                "broken link); put the .safetensors file back or pick another, then refresh")
    return path, refuse_pickle(path, input_name)


def model_dtype(dtypes: Mapping[str, torch.dtype], shapes: Mapping[str, tuple[int, ...]],
                model_prefix: str) -> torch.dtype:
    """The 16-bit dtype ComfyUI would pick for the model in 16-bit (from the source's dtypes and size, before
    quantizing). Left to itself, `unet_dtype()` picks float8 for a mostly-FP8 state dict on FP8 GPUs and on cards
    with less free memory than 2 bytes a parameter, and would then cast the protected layers, biases, norms and
    embedders to float8 without a scale."""
    sizes: dict[torch.dtype, int] = {}
    params = 0
    for key, dtype in dtypes.items():
        if key.startswith(model_prefix):
            params += math.prod(shapes[key])
            if dtype.is_floating_point and dtype not in FLOAT8_DTYPES:
                sizes[dtype] = sizes.get(dtype, 0) + math.prod(shapes[key])
    source = max(sizes, key=sizes.get, default=torch.float16)
    dtype = comfy.model_management.unet_dtype(model_params=params, weight_dtype=source,
                                              supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    return source if dtype in FLOAT8_DTYPES else dtype


def _settings(fp8_format: str, scaling: str, protect_preset: str, compute: str, protect_patterns: str) -> dict:
    """The loaders' quantization inputs as QuantConfig fields (the budget is resolved apart: `_config`)."""
    return {"fp8_format": fp8_format, "scaling": scaling, "protect_preset": protect_preset, "compute": compute,
            "protect_patterns": protect_patterns}


def _quantize_file(path: str, header: dict, model_prefix: str, settings: dict, memory_budget: str, **stream):
    """Stream-quantize a checked file: (state dict, {model layer: FP8 format}, report, the model's 16-bit dtype for
    ComfyUI's build)."""
    shapes, dtypes = header_shapes_dtypes(header)
    dtype, config = _config(settings, memory_budget, dtypes, shapes, model_prefix)
    sd, layer_formats, report = quantize_safetensors_stream(path, config, header=header, model_prefix=model_prefix,
                                                            progress=progress_callback(),
                                                            budget_itemsize=dtype.itemsize,
                                                            device=quantize_device(shapes, model_prefix), **stream)
    return sd, layer_formats, report, dtype


def quantize_device(shapes: Mapping[str, tuple[int, ...]], model_prefix: str) -> torch.device:
    """Where the diffusion model is quantized: the device ComfyUI will build it on (`unet_inital_load_device`,
    asked at FP8 size). A GPU there gets the 16-bit tensors as they are read and quantizes them itself, instead of
    waiting for the CPU's quantizer; otherwise (a small card, --lowvram, --cpu) the CPU quantizes as before."""
    params = sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(model_prefix))
    return comfy.model_management.unet_inital_load_device(params, torch.float8_e4m3fn)


def _config(settings: dict, memory_budget: str, dtypes, shapes, model_prefix: str) -> tuple[torch.dtype, QuantConfig]:
    """(the model's 16-bit dtype, the run's config: the node's quantization inputs and its resolved budget, whose
    16-bit tensors count at that dtype's size, as ComfyUI will hold them)."""
    check_native_settings(settings)
    check_compute_supported(_own_compute(settings))
    budget = resolve_budget(memory_budget, shapes=shapes, model_prefix=model_prefix)
    config = QuantConfig(**{**settings, "compute": _own_compute(settings)}, memory_budget=budget)
    return model_dtype(dtypes, shapes, model_prefix), config


def _own_compute(settings: dict) -> str:
    """The compute of this pack's FP8 layers in the model: with comfyui_native, only the text encoders have them."""
    return "auto" if settings["compute"] == COMFYUI_NATIVE else settings["compute"]


def _model_options(settings: dict, dtype: torch.dtype, sd: dict, layer_formats: dict[str, str], model_prefix: str,
                   metadata: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """(model_options, header metadata) for ComfyUI's build of the diffusion model: our FP8 Linear as its
    operations, or (comfyui_native) the native layout, from which ComfyUI builds its own FP8 layers."""
    if settings["compute"] == COMFYUI_NATIVE:
        return {"dtype": dtype}, native_state_dict(sd, layer_formats, model_prefix, metadata)
    return {"custom_operations": make_fp8_ops(settings["compute"]), "dtype": dtype}, metadata


class SD35FP8CheckpointLoader(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35FP8CheckpointLoader",
            display_name="Load SD3.5 Checkpoint (FP8)",
            category=f"{CATEGORY}/loaders",
            description="Loads an SD3.5 all-in-one checkpoint and quantizes it to FP8 while reading it: per-channel "
                        "scaled FP8 Linear layers and an FP8 pos_embed, with embedders and final layer kept 16-bit "
                        "(preset auto detects Large, Medium or Large Turbo). The report lists every layer with its "
                        "bytes and error.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="An SD3.5 .safetensors checkpoint from models/checkpoints."),
                *quant_inputs(with_disabled=True, loader=True),
                io.Combo.Input("text_encoder_fp8", options=list(LOADER_TEXT_ENCODER_CHOICES), default="t5xxl_only",
                               tooltip="Text encoders in FP8. t5xxl_only (default): T5-XXL in FP8, CLIP-L/G kept "
                                       "16-bit, as SD3.5's prompt following needs. none: all 16-bit. all: every "
                                       "text encoder in FP8."),
                protect_patterns_input(),
                memory_budget_input(),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The FP8 diffusion model."),
                io.Clip.Output(display_name="clip", tooltip="Text encoders (T5-XXL in FP8 by default)."),
                io.Vae.Output(display_name="vae", tooltip="The 16-channel VAE."),
                io.String.Output(display_name="report", tooltip="Per-layer quantization report."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name, fp8_format, scaling, protect_preset, compute, text_encoder_fp8,
                protect_patterns="", memory_budget="") -> io.NodeOutput:
        path, header = _model_file("checkpoints", ckpt_name, "ckpt_name")
        embeddings = folder_paths.get_folder_paths("embeddings")
        if fp8_format == "disabled":
            if parse_budget(memory_budget) is not None:
                raise ValueError("memory_budget: fitting a budget needs FP8; pick an fp8_format or set it off")
            with reading(path, "ckpt_name", memory_advice=UNQUANTIZED_NEEDS_MORE):
                model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, embedding_directory=embeddings)
            report_text = f"{ckpt_name}: fp8_format=disabled, loaded as stored (no FP8)."
        else:
            settings = _settings(fp8_format, scaling, protect_preset, compute, protect_patterns)
            sd, layer_formats, report, dtype = _quantize_file(path, header, CHECKPOINT_MODEL_PREFIX, settings,
                                                              memory_budget, text_encoders=text_encoder_fp8,
                                                              input_name="ckpt_name",
                                                              memory_advice=CHECKPOINT_NEEDS_LESS)
            options, metadata = _model_options(settings, dtype, sd, layer_formats, CHECKPOINT_MODEL_PREFIX,
                                               _metadata(header))
            with fp8_tables_in_place(sd, CHECKPOINT_MODEL_PREFIX):
                model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
                    sd, embedding_directory=embeddings, model_options=options,
                    te_model_options={"custom_operations": make_fp8_ops(_own_compute(settings))}, metadata=metadata)
            if model is None:
                raise ValueError(f"ckpt_name: {ckpt_name} is not a diffusion model checkpoint ComfyUI recognises")
            record_info(model, ckpt_name, report)
            for patcher in (model, getattr(clip, "patcher", None)):
                if patcher is not None:
                    use_fp8_patcher(patcher)
            report_text = f"{ckpt_name}\n{report.to_text()}"
        if clip is None:
            clip = MissingTextEncoders()
            report_text += "\nNo text encoders in this checkpoint: use TripleCLIPLoader for the CLIP input."
        return io.NodeOutput(model, clip, vae, report_text)


def _diffusers_transformers() -> dict[str, Path]:
    """{name: transformer folder} of the SD3-family diffusers-format folders under diffusion_models/ and diffusers/
    (ComfyUI lists none); the first found wins."""
    found: dict[str, Path] = {}
    for folder in ("diffusion_models", "diffusers"):
        for root in folder_paths.get_folder_paths(folder):
            base = Path(root)
            if not base.is_dir():
                continue
            for config in sorted(base.glob("*/transformer/config.json")) + sorted(base.glob("*/config.json")):
                try:
                    if json.loads(config.read_text()).get("_class_name") == "SD3Transformer2DModel":
                        found.setdefault(str(config.parent.relative_to(base)).split("/transformer")[0], config.parent)
                except (OSError, ValueError):
                    continue
    return found


def read_diffusers_transformer(folder: Path) -> dict:
    """All tensors of a diffusers transformer folder (single file or sharded with an index)."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        with reading(index, "model_name"):
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    sd = {}
    for name in files:
        if Path(name).name != name or not name.endswith(".safetensors"):
            model = folder.parent.name if folder.name == "transformer" else folder.name
            raise ValueError(f"model_name: {model}'s weight index names {name!r}; only .safetensors files in the "
                             "same folder are read. Fix the index or convert the shards to safetensors")
        path = folder / name
        refuse_pickle(str(path), "model_name")
        with reading(path, "model_name", memory_advice=DIFFUSERS_NEEDS_MORE):
            sd.update(comfy.utils.load_torch_file(str(path)))
    return sd


class SD35FP8DiffusionModelLoader(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35FP8DiffusionModelLoader",
            display_name="Load SD3.5 Diffusion Model (FP8)",
            category=f"{CATEGORY}/loaders",
            description="Loads an SD3.5 transformer (a diffusion_models .safetensors file, or a diffusers-format "
                        "folder) and quantizes it to FP8 while reading it. Pair it with TripleCLIPLoader and a VAE "
                        "loader.",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list("diffusion_models")
                               + sorted(_diffusers_transformers()),
                               tooltip="A .safetensors transformer in models/diffusion_models, or a diffusers folder "
                                       "(with transformer/config.json) there or in models/diffusers."),
                *quant_inputs(loader=True),
                protect_patterns_input(),
                memory_budget_input(),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The FP8 diffusion model."),
                io.String.Output(display_name="report", tooltip="Per-layer quantization report."),
            ],
        )

    @classmethod
    def execute(cls, model_name, fp8_format, scaling, protect_preset, compute, protect_patterns="",
                memory_budget="") -> io.NodeOutput:
        settings = _settings(fp8_format, scaling, protect_preset, compute, protect_patterns)
        prefix = ""  # the model's keys start with it: a ModelSave file has a checkpoint's (as ComfyUI's loader reads)
        if model_name in folder_paths.get_filename_list("diffusion_models"):
            path, header = _model_file("diffusion_models", model_name, "model_name")
            if any(key.startswith(CHECKPOINT_MODEL_PREFIX) for key in header):
                prefix = CHECKPOINT_MODEL_PREFIX
            sd, layer_formats, report, dtype = _quantize_file(path, header, prefix, settings, memory_budget,
                                                              input_name="model_name", memory_advice=NEED_LESS)
            metadata = _metadata(header)
        else:
            folder = _diffusers_transformers().get(model_name)
            if folder is None:
                raise FileNotFoundError(f"model_name: {model_name!r} is not a diffusers folder in "
                                        "models/diffusion_models")
            raw = read_diffusers_transformer(folder)
            converted = comfy.model_detection.convert_diffusers_mmdit(raw, "")
            if converted is None:
                raise ValueError(f"model_name: {model_name} is a diffusers folder but not an SD3-family transformer")
            del raw
            dtype, config = _config(settings, memory_budget, {k: v.dtype for k, v in converted.items()},
                                    {k: tuple(v.shape) for k, v in converted.items()}, "")
            sd, layer_formats, report = quantize_state_dict(converted, config, model_prefix="",
                                                            progress=progress_callback(),
                                                            budget_itemsize=dtype.itemsize)
            metadata = {}
        options, metadata = _model_options(settings, dtype, sd, layer_formats, prefix, metadata)
        with fp8_tables_in_place(sd, prefix):
            model = comfy.sd.load_diffusion_model_state_dict(sd, metadata=metadata, model_options=options)
        if model is None:
            raise ValueError(f"model_name: {model_name} is not a diffusion model ComfyUI recognises")
        record_info(model, model_name, report)
        use_fp8_patcher(model)
        return io.NodeOutput(model, f"{model_name}\n{report.to_text()}")
