"""Our FP8 model saved by ComfyUI's generic save nodes (ModelSave, CheckpointSave: anything that saves through the
model's state dict) loads back right in stock ComfyUI on the host that wrote it, and in our loaders (issue 29).

Each saved file is reloaded by the stock loader (UNETLoader / CheckpointLoaderSimple) and by ours, and one denoiser
call on fixed inputs is compared with the in-memory model the file was written from (loaded as a save loads it:
patches such as a LoRA merged, `force_patch_weights`): within one more FP8 rounding. The FP16 model still
round-trips exactly. The file is in the layout the host reads (nodes/stock_layout.py): ComfyUI 0.8+ per-layer
`comfy_quant` entries with one float8_e4m3fn scale per layer, ComfyUI 0.3.75 16-bit weights.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from helpers import FP8, host_quantized_layers
from prompts import dm_loader, fp8_loader, quantize_model, show
from safetensors import safe_open

from tools import comfy_host

MAX_ERROR = 0.025  # relative L2: one more FP8 rounding at most (before the fix: ~1.0)
SAVE_LOG = re.compile(r"SD3\.5 FP8: a save node wrote the diffusion model's (\d+) FP8 layer")
MODELS = ("per_channel", "per_tensor", "lora", "quantize_model", "fp16")
SAVERS = ("ModelSave", "CheckpointSave")
CPU = torch.device("cpu")
FP8_LAYER = "joint_blocks.0.x_block.mlp.fc1"  # an FP8 layer the fixture LoRA patches
PROTECTED = "context_embedder"  # a layer the loaders keep 16-bit


def _inputs(dm) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"x": torch.randn(1, dm.x_embedder.proj.in_channels, 8, 8, generator=gen),
            "timesteps": torch.tensor([500.0]),
            "context": torch.randn(1, 7, dm.context_embedder.in_features, generator=gen),
            "y": torch.randn(1, dm.y_embedder.mlp[0].in_features, generator=gen)}


def denoise(patcher, as_saved: bool = False) -> torch.Tensor:
    """One call of the diffusion model as `patcher` runs it, or (as_saved) as a save node loads it: its patches
    merged into the weights (ComfyUI's save nodes load with force_patch_weights)."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        patcher.patch_model(CPU, lowvram_model_memory=0, force_patch_weights=as_saved)
        try:
            dm = patcher.model.diffusion_model
            return dm(**_inputs(dm)).float()
        finally:
            patcher.unpatch_model(CPU)


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def _to_save(ckpt: str, variant: str, lora: str) -> tuple[dict, list, list]:
    """(nodes, model output, CLIP output) of the model to save; its VAE is ["src", 2]."""
    stock = {"src": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    if variant == "fp16":
        return stock, ["src", 0], ["src", 1]
    if variant == "quantize_model":  # our layers as object patches on the stock model
        return {**stock, "q": quantize_model(["src", 0])}, ["q", 0], ["src", 1]
    nodes = {"src": fp8_loader(ckpt, scaling="per_tensor" if variant == "per_tensor" else "per_channel")}
    if variant != "lora":
        return nodes, ["src", 0], ["src", 1]
    nodes["lora"] = {"class_type": "LoraLoader", "inputs": {"model": ["src", 0], "clip": ["src", 1], "lora_name": lora,
                                                            "strength_model": 1.0, "strength_clip": 1.0}}
    return nodes, ["lora", 0], ["lora", 1]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def saved(runner, comfy_base, fixture_files, tiny_lora) -> dict:
    """{(variant, saver): (file, the in-memory model's output as saved, its output as it runs, the save's log)}."""
    ckpt = fixture_files["large_all_in_one"].name
    records, root = _Records(), logging.getLogger()
    level = root.level
    root.addHandler(records)
    root.setLevel(min(level, logging.INFO))
    out = {}
    try:
        for variant in MODELS:
            for saver in SAVERS:
                prefix = f"stock_save_{variant}_{saver}"
                prompt, model, clip = _to_save(ckpt, variant, tiny_lora)
                folder = "diffusion_models" if saver == "ModelSave" else "checkpoints"
                inputs = {"model": model, "filename_prefix": f"{folder}/{prefix}"}
                if saver == "CheckpointSave":
                    inputs.update(clip=clip, vae=["src", 2])
                prompt["save"] = {"class_type": saver, "inputs": inputs}
                start = len(records.messages)
                runner.run(prompt)
                files = sorted((comfy_base / "output" / folder).glob(f"{prefix}_*.safetensors"))
                assert len(files) == 1, files
                logs = [m for m in records.messages[start:] if SAVE_LOG.search(m)]
                patcher = runner.node_outputs(model[0])[model[1]]
                out[variant, saver] = files[0], denoise(patcher, as_saved=True), denoise(patcher), logs
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    return out


def _reload(runner, comfy_base, path, saver: str, stock_only: bool) -> dict:
    """{"stock" / "ours": the saved file's model as that loader reads it}."""
    import folder_paths

    if saver == "ModelSave":
        name = comfy_host.link_model(comfy_base, "diffusion_models", path)
        loaders = {"stock": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
                   "ours": dm_loader(name)}
    else:
        name = comfy_host.link_model(comfy_base, "checkpoints", path)
        loaders = {"stock": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
                   "ours": fp8_loader(name)}
    folder_paths.filename_list_cache.clear()
    if stock_only:
        del loaders["ours"]
    prompt = {**{f"ld_{tag}": loader for tag, loader in loaders.items()},
              **{f"o_{tag}": show([f"ld_{tag}", 0]) for tag in loaders}}
    runner.run(prompt)
    return {tag: runner.node_outputs(f"ld_{tag}")[0] for tag in loaders}


def _file_layout(path) -> dict:
    """{key: (dtype, shape)} and the comfy_quant entries of a saved file's diffusion model."""
    with safe_open(str(path), "pt") as f:
        keys = [k.removeprefix("model.diffusion_model.") for k in f.keys() if k.startswith("model.diffusion_model.")]
        tensors = {k: f.get_tensor("model.diffusion_model." + k) for k in keys}
    entries = {k.removesuffix(".comfy_quant"): json.loads(bytes(t.tolist())) for k, t in tensors.items()
               if k.endswith(".comfy_quant")}
    return {"tensors": tensors, "entries": entries}


@pytest.mark.parametrize("saver", SAVERS)
@pytest.mark.parametrize("variant", MODELS)
def test_stock_saved_model_reloads_like_the_model_that_was_saved(runner, comfy_base, saved, variant, saver):
    path, ref, running, logs = saved[variant, saver]
    models = _reload(runner, comfy_base, path, saver, stock_only=variant == "fp16")
    outputs = {tag: denoise(model) for tag, model in models.items()}
    errors = {tag: _error(out, ref) for tag, out in outputs.items()}
    print(f"{comfy_host.host_label()} {variant} {saver}: vs the model as saved "
          + ", ".join(f"{t} {e:.5f}" for t, e in errors.items())
          + f"; stock vs the model as it runs in memory {_error(outputs['stock'], running):.5f}; stock "
          f"model dtype {models['stock'].model.get_dtype()}")
    # whatever dtype the host picks for the model (float8 for a mostly-FP8 file on FP8 devices), the 16-bit layers
    # of the file stay 16-bit in it
    stock_dm = models["stock"].model.diffusion_model
    assert stock_dm.context_embedder.weight.dtype not in FP8, stock_dm.context_embedder.weight.dtype
    if variant == "fp16":
        assert errors["stock"] == 0.0, errors
        assert not logs, logs  # no FP8 layer of ours: nothing to say
        return
    assert all(e <= MAX_ERROR for e in errors.values()), errors
    assert len(logs) == 1, logs  # said once per save, naming how many layers went which way
    layout = _file_layout(path)
    tensors, entries = layout["tensors"], layout["entries"]
    assert tensors[f"{PROTECTED}.weight"].dtype in (torch.float16, torch.bfloat16, torch.float32)  # never float8
    assert f"{PROTECTED}.comfy_quant" not in tensors and f"{PROTECTED}.weight_scale" not in tensors
    if comfy_host.host_version() == "0.8.0":  # ComfyUI's per-layer FP8 entries, one scale per layer
        assert entries and all(e == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
                               for e in entries.values())
        assert all(tensors[f"{layer}.weight"].dtype == torch.float8_e4m3fn
                   and tensors[f"{layer}.weight_scale"].numel() == 1 for layer in entries)
        assert (FP8_LAYER in entries) == (variant != "lora")  # merged by the save: 16-bit, not rounded twice
        assert FP8_LAYER not in entries or FP8_LAYER in host_quantized_layers(models["stock"])
    else:  # 0.3.75 reads no scale a save node can write: the FP8 layers 16-bit
        assert not entries and not any(k.endswith(("weight_scale", "scale_weight", "scaled_fp8")) for k in tensors)
        assert tensors[f"{FP8_LAYER}.weight"].dtype in (torch.float16, torch.bfloat16, torch.float32)


def test_state_dict_outside_a_save_is_the_layer_as_it_is(runner, fixture_files):
    """Only a save rewrites the layout: ModelPatcher's key patches, LoRA key maps and model merging read the state
    dict as the layer holds it (FP8 weight and its scale)."""
    prompt = {"ld": fp8_loader(fixture_files["large_all_in_one"].name), "o": show(["ld", 0])}
    runner.run(prompt)
    model = runner.node_outputs("ld")[0]
    sd = model.model.diffusion_model.state_dict()
    assert sd[f"{FP8_LAYER}.weight"].dtype == torch.float8_e4m3fn and f"{FP8_LAYER}.weight_scale" in sd
    assert not any(k.endswith("comfy_quant") for k in sd)
    assert f"diffusion_model.{FP8_LAYER}.weight" in model.get_key_patches("diffusion_model.")


def test_text_encoders_in_fp8_saved_by_checkpointsave_read_back_right(runner, comfy_base, fixture_files):
    """T5-XXL and CLIP-L in FP8 (text_encoder_fp8=all) through CheckpointSave: the text encoders are written 16-bit
    (ComfyUI reads FP8 scales for T5-XXL alone, and not on every path), so both loaders encode the prompt as the
    in-memory text encoders do."""
    import folder_paths

    ckpt = fixture_files["large_t5xxl_all_in_one"].name
    prompt = {"src": fp8_loader(ckpt, text_encoder_fp8="all"),
              "save": {"class_type": "CheckpointSave", "inputs": {
                  "model": ["src", 0], "clip": ["src", 1], "vae": ["src", 2],
                  "filename_prefix": "checkpoints/stock_save_text_encoders"}},
              "e_mem": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["src", 1], "text": "a red fox"}},
              "o_mem": show(["e_mem", 0])}
    runner.run(prompt)
    files = sorted((comfy_base / "output" / "checkpoints").glob("stock_save_text_encoders_*.safetensors"))
    assert len(files) == 1, files
    with safe_open(str(files[0]), "pt") as f:
        te = {k: f.get_tensor(k).dtype for k in f.keys() if k.startswith("text_encoders.")}
    assert te and not any(d in (torch.float8_e4m3fn, torch.float8_e5m2) for d in te.values())
    assert not any(k.endswith(("weight_scale", "comfy_quant")) for k in te)
    name = comfy_host.link_model(comfy_base, "checkpoints", files[0])
    folder_paths.filename_list_cache.clear()
    reload = {"ld_stock": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
              "ld_ours": fp8_loader(name, text_encoder_fp8="all")}
    for tag in ("stock", "ours"):
        reload[f"e_{tag}"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [f"ld_{tag}", 1], "text": "a red fox"}}
        reload[f"o_{tag}"] = show([f"e_{tag}", 0])
    runner.run({**prompt, **reload})
    ref = runner.node_outputs("e_mem")[0][0][0]
    errors = {tag: _error(runner.node_outputs(f"e_{tag}")[0][0][0].float(), ref.float()) for tag in ("stock", "ours")}
    print(f"{comfy_host.host_label()} text encoders CheckpointSave: conditioning vs in memory "
          + ", ".join(f"{t} {e:.5f}" for t, e in errors.items()))
    assert all(e <= MAX_ERROR for e in errors.values()), errors
