"""Save FP8 Model writes files stock ComfyUI loads; missing text encoders explain themselves (text encoders in FP8:
test_t5xxl.py)."""

from __future__ import annotations

import json

import pytest
from helpers import fp8_layers, host_quantized_layers
from prompts import decode_and_preview, encode, fp8_loader, ksampler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tools import comfy_host


def _save_prompt(ckpt: str, prefix: str, layout: str = "auto") -> dict:
    return {"ld": fp8_loader(ckpt),
            "save": {"class_type": "SD35FP8SaveModel",
                     "inputs": {"model": ["ld", 0], "filename_prefix": prefix, "layout": layout}}}


@pytest.mark.parametrize("layout", ["auto", "stock_compatible"])
def test_saved_file_loads_with_stock_unetloader_and_samples(runner, comfy_base, fixture_files, layout, caplog):
    ckpt = fixture_files["large_all_in_one"].name
    out = runner.run(_save_prompt(ckpt, f"diffusion_models/saved_{layout}", layout))
    text = out["save"]["text"][0]
    saved = sorted((comfy_base / "output" / "diffusion_models").glob(f"saved_{layout}_*.safetensors"))
    assert len(saved) == 1 and saved[0].name in text
    assert not list((comfy_base / "output" / "diffusion_models").glob(".*.tmp"))
    with safe_open(str(saved[0]), "pt") as f:
        meta = f.metadata()
        layers = json.loads(meta["_quantization_metadata"])["layers"]
        scale = f.get_tensor("joint_blocks.0.x_block.attn.qkv.weight_scale")
    assert meta["sd35_fp8.source"] == ckpt and meta["sd35_fp8.layout"] == layout
    assert layers["joint_blocks.0.x_block.attn.qkv"] == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    assert scale.numel() == (1 if layout == "stock_compatible" else scale.shape[0])

    name = comfy_host.link_model(comfy_base, "diffusion_models", saved[0])
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck"),
              "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
              "ld": fp8_loader(ckpt)}
    prompt["ks_stock"] = ksampler(["unet", 0])
    prompt["ks_ours"] = ksampler(["ld", 0])
    prompt.update(decode_and_preview(["ks_stock", 0], ["ck", 2], "stock"))
    prompt.update(decode_and_preview(["ks_ours", 0], ["ck", 2], "ours"))
    with caplog.at_level("INFO"):
        runner.run(prompt)
    stock_model = runner.node_outputs("unet")[0]
    assert "joint_blocks.0.x_block.attn.qkv" in host_quantized_layers(stock_model)  # ComfyUI's own ops read it
    # no fallback of ComfyUI's own FP8 path (comfy-kitchen logs one where its FP8 matmul rejects a layer): our
    # layers are marked full-precision, which 0.8.0 honours on FP8 GPUs (FP8-device mode) as everywhere
    assert "falling back" not in caplog.text and "Exception during fp8 op" not in caplog.text
    if comfy_host.host_version() == "0.8.0":  # 0.3.75 takes its FP8-matmul route only for layers with input_scale
        assert stock_model.model.diffusion_model.joint_blocks[0].x_block.attn.qkv._full_precision_mm
    stock, ours = runner.node_outputs("ks_stock")[0]["samples"], runner.node_outputs("ks_ours")[0]["samples"]
    rel = float((stock - ours).norm() / ours.norm())
    assert rel < (1e-2 if layout == "auto" else 5e-2), rel


def test_save_never_overwrites(runner, comfy_base, fixture_files):
    ckpt = fixture_files["large_all_in_one"].name
    runner.run(_save_prompt(ckpt, "twice/model"))
    prompt = _save_prompt(ckpt, "twice/model")
    prompt["save"]["inputs"]["layout"] = "auto"
    prompt["ld"]["inputs"]["scaling"] = "per_tensor"  # a different model, so the node runs again
    runner.run(prompt)
    files = sorted((comfy_base / "output" / "twice").glob("model_*.safetensors"))
    assert len(files) == 2 and files[0].name != files[1].name


def test_checkpoint_without_text_encoders_says_use_tripleclip(runner, comfy_base, fixture_files, tmp_path):
    sd = load_file(str(fixture_files["large_all_in_one"]))
    no_te = {k: v for k, v in sd.items() if not k.startswith("text_encoders.")}
    path = tmp_path / "tiny_sd35_large_no_te.safetensors"
    save_file(no_te, str(path))
    name = comfy_host.link_model(comfy_base, "checkpoints", path)
    import folder_paths

    folder_paths.filename_list_cache.clear()
    prompt = {"ld": fp8_loader(name), "show": {"class_type": "PreviewAny", "inputs": {"source": ["ld", 3]}}}
    runner.run(prompt)
    assert "TripleCLIPLoader" in runner.node_outputs("ld")[3]
    prompt["enc"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ld", 1], "text": "x"}}
    prompt["show2"] = {"class_type": "PreviewAny", "inputs": {"source": ["enc", 0]}}
    with pytest.raises(comfy_host.PromptError, match="TripleCLIPLoader"):
        runner.run(prompt)
    assert fp8_layers(runner.node_outputs("ld")[0])
