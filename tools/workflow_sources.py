"""The shipped workflows, written once as API-format graphs (the source of truth).

`python -m tools.make_workflows` writes them to workflows/api/*.json (API format, for the
server and scripts) and workflows/*.json (UI format, for the frontend), so the two forms
never drift apart. Default model names are the official SD3.5 file names.
"""

from __future__ import annotations

LARGE = "sd3.5_large.safetensors"
MEDIUM = "sd3.5_medium.safetensors"
TURBO = "sd3.5_large_turbo.safetensors"
PROMPT = "a photo of a red fox standing in fresh snow, morning light, detailed fur"
NEGATIVE = "blurry, low quality"


def _loader(ckpt: str) -> dict:
    return {"class_type": "SD35FP8CheckpointLoader", "_meta": {"title": "Load SD3.5 Checkpoint (FP8)"}, "inputs": {
        "ckpt_name": ckpt, "fp8_format": "float8_e4m3fn", "scaling": "per_channel", "protect_preset": "auto",
        "compute": "auto", "text_encoder_fp8": "t5xxl_only", "protect_patterns": ""}}


def _text(clip: list, text: str, title: str) -> dict:
    return {"class_type": "CLIPTextEncode", "_meta": {"title": title}, "inputs": {"clip": clip, "text": text}}


def _latent(size: int = 1024) -> dict:
    return {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}


def _sampler(model: list, preset: str, seed: int = 42, steps: int = 28, cfg: float = 4.5, skip: str = "") -> dict:
    return {"class_type": "SD35FP8Sampler", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "seed": seed, "preset": preset, "steps": steps, "cfg": cfg, "sampler_name": "dpmpp_2m",
        "scheduler": "sgm_uniform", "shift": 3.0, "denoise": 1.0, "skip_layers": skip, "skip_scale": 2.5,
        "skip_start": 0.01, "skip_end": 0.2}}


def _show(source: list, title: str) -> dict:
    return {"class_type": "PreviewAny", "_meta": {"title": title}, "inputs": {"source": source}}


def _decode_save(samples: list, vae: list, prefix: str, tag: str = "") -> dict:
    return {f"decode{tag}": {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": vae}},
            f"save{tag}": {"class_type": "SaveImage", "inputs": {"images": [f"decode{tag}", 0],
                                                                 "filename_prefix": prefix}}}


def _txt2img(ckpt: str, preset: str, prefix: str, **sampler) -> dict:
    return {
        "loader": _loader(ckpt),
        "pos": _text(["loader", 1], PROMPT, "Positive"),
        "neg": _text(["loader", 1], NEGATIVE, "Negative"),
        "latent": _latent(),
        "sampler": _sampler(["loader", 0], preset, **sampler),
        **_decode_save(["sampler", 0], ["loader", 2], prefix),
        "report": _show(["loader", 3], "Quantization report"),
        "stats": _show(["sampler", 1], "Sampling stats"),
    }


def txt2img_fp8() -> dict:
    return _txt2img(LARGE, "sd35_large", "sd35_fp8/txt2img")


def medium_skip_layer_guidance() -> dict:
    return _txt2img(MEDIUM, "sd35_medium", "sd35_fp8/medium_slg", steps=40, skip="7,8,9")


def large_turbo_4_steps() -> dict:
    return _txt2img(TURBO, "sd35_large_turbo", "sd35_fp8/turbo", steps=4, cfg=1.0)


def ab_fp16_vs_fp8() -> dict:
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint (FP16)"},
                 "inputs": {"ckpt_name": LARGE}},
        "quantize": {"class_type": "SD35FP8QuantizeModel", "inputs": {
            "model": ["ckpt", 0], "fp8_format": "float8_e4m3fn", "scaling": "per_channel",
            "protect_preset": "auto", "compute": "auto", "protect_patterns": ""}},
        "pos": _text(["ckpt", 1], PROMPT, "Positive"),
        "neg": _text(["ckpt", 1], NEGATIVE, "Negative"),
        "latent": _latent(),
        "sampler_fp16": _sampler(["ckpt", 0], "sd35_large"),
        "sampler_fp8": _sampler(["quantize", 0], "sd35_large"),
        **_decode_save(["sampler_fp16", 0], ["ckpt", 2], "sd35_fp8/ab_fp16", "_fp16"),
        **_decode_save(["sampler_fp8", 0], ["ckpt", 2], "sd35_fp8/ab_fp8", "_fp8"),
        "compare": {"class_type": "SD35FP8CompareImages",
                    "inputs": {"image_a": ["decode_fp16", 0], "image_b": ["decode_fp8", 0]}},
        "difference": {"class_type": "PreviewImage", "inputs": {"images": ["compare", 2]}},
        "scores": _show(["compare", 3], "SSIM / PSNR"),
        "report": _show(["quantize", 1], "Quantization report"),
    }
    return graph


def quantize_and_save() -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MEDIUM}},
        "quantize": {"class_type": "SD35FP8QuantizeModel", "inputs": {
            "model": ["ckpt", 0], "fp8_format": "float8_e4m3fn", "scaling": "per_channel",
            "protect_preset": "auto", "compute": "auto", "protect_patterns": ""}},
        "save": {"class_type": "SD35FP8SaveModel", "inputs": {
            "model": ["quantize", 0], "filename_prefix": "diffusion_models/sd3.5_medium_fp8",
            "layout": "stock_compatible"}},
        "report": _show(["quantize", 1], "Quantization report"),
    }


def fp8_with_lora() -> dict:
    graph = _txt2img(LARGE, "sd35_large", "sd35_fp8/lora")
    graph["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["loader", 0], "lora_name": "sd3.5_large_lora.safetensors", "strength_model": 1.0}}
    graph["sampler"]["inputs"]["model"] = ["lora", 0]
    return graph


def hardware_aware() -> dict:
    graph = _txt2img(MEDIUM, "sd35_medium", "sd35_fp8/hardware_aware", steps=40, skip="7,8,9")
    graph["hardware"] = {"class_type": "SD35FP8HardwareInfo", "inputs": {"device": "auto"}}
    graph["capability"] = _show(["hardware", 0], "FP8 capability")
    graph["recommended"] = _show(["hardware", 2], "compute=auto will use")
    return graph


WORKFLOWS = {
    "sd35_fp8_txt2img": txt2img_fp8,
    "sd35_fp8_ab_compare": ab_fp16_vs_fp8,
    "sd35_fp8_medium_skip_layer_guidance": medium_skip_layer_guidance,
    "sd35_fp8_large_turbo_4_steps": large_turbo_4_steps,
    "sd35_fp8_quantize_and_save": quantize_and_save,
    "sd35_fp8_lora": fp8_with_lora,
    "sd35_fp8_hardware_aware": hardware_aware,
}
