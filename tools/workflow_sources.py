"""The shipped workflows, written once as API-format graphs (the source of truth).

`python -m tools.make_workflows` writes them to workflows/api/*.json (API format, for the
server and scripts) and workflows/*.json (UI format, for the frontend), so the two forms
never drift apart. Default model names are the official SD3.5 file names.
"""

from __future__ import annotations

from functools import partial

LARGE = "sd3.5_large.safetensors"
MEDIUM = "sd3.5_medium.safetensors"
TURBO = "sd3.5_large_turbo.safetensors"
PROMPT = "a photo of a red fox standing in fresh snow, morning light, detailed fur"
NEGATIVE = "blurry, low quality"
# the FP8 settings shared by the FP8 checkpoint loader and Quantize Model
FP8 = {"fp8_format": "float8_e4m3fn", "scaling": "per_channel", "protect_preset": "auto", "compute": "auto"}


def _node(class_type: str, title: str = "", **inputs) -> dict:
    return {"class_type": class_type, **({"_meta": {"title": title}} if title else {}), "inputs": inputs}


def _sampler(model: list, preset: str, seed: int = 42, steps: int = 28, cfg: float = 4.5, skip: str = "") -> dict:
    return _node("SD35FP8Sampler", model=model, positive=["pos", 0], negative=["neg", 0], latent_image=["latent", 0],
                 seed=seed, preset=preset, steps=steps, cfg=cfg, sampler_name="dpmpp_2m", scheduler="sgm_uniform",
                 shift=3.0, denoise=1.0, skip_layers=skip, skip_scale=2.5, skip_start=0.01, skip_end=0.2)


def _decode_save(samples: list, vae: list, prefix: str, tag: str = "") -> dict:
    return {f"decode{tag}": _node("VAEDecode", samples=samples, vae=vae),
            f"save{tag}": _node("SaveImage", images=[f"decode{tag}", 0], filename_prefix=prefix)}


def _txt2img(ckpt: str, preset: str, prefix: str, **sampler) -> dict:
    return {
        "loader": _node("SD35FP8CheckpointLoader", "Load SD3.5 Checkpoint (FP8)", ckpt_name=ckpt, **FP8,
                        text_encoder_fp8="t5xxl_only", protect_patterns=""),
        "pos": _node("CLIPTextEncode", "Positive", clip=["loader", 1], text=PROMPT),
        "neg": _node("CLIPTextEncode", "Negative", clip=["loader", 1], text=NEGATIVE),
        "latent": _node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1),
        "sampler": _sampler(["loader", 0], preset, **sampler),
        **_decode_save(["sampler", 0], ["loader", 2], prefix),
        "report": _node("PreviewAny", "Quantization report", source=["loader", 3]),
        "stats": _node("PreviewAny", "Sampling stats", source=["sampler", 1]),
    }


def ab_fp16_vs_fp8() -> dict:
    return {
        "ckpt": _node("CheckpointLoaderSimple", "Load Checkpoint (FP16)", ckpt_name=LARGE),
        "quantize": _node("SD35FP8QuantizeModel", model=["ckpt", 0], **FP8, protect_patterns=""),
        "pos": _node("CLIPTextEncode", "Positive", clip=["ckpt", 1], text=PROMPT),
        "neg": _node("CLIPTextEncode", "Negative", clip=["ckpt", 1], text=NEGATIVE),
        "latent": _node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1),
        "sampler_fp16": _sampler(["ckpt", 0], "sd35_large"),
        "sampler_fp8": _sampler(["quantize", 0], "sd35_large"),
        **_decode_save(["sampler_fp16", 0], ["ckpt", 2], "sd35_fp8/ab_fp16", "_fp16"),
        **_decode_save(["sampler_fp8", 0], ["ckpt", 2], "sd35_fp8/ab_fp8", "_fp8"),
        "compare": _node("SD35FP8CompareImages", image_a=["decode_fp16", 0], image_b=["decode_fp8", 0]),
        "difference": _node("PreviewImage", images=["compare", 2]),
        "scores": _node("PreviewAny", "SSIM / PSNR", source=["compare", 3]),
        "report": _node("PreviewAny", "Quantization report", source=["quantize", 1]),
    }


def quantize_and_save() -> dict:
    return {
        "ckpt": _node("CheckpointLoaderSimple", ckpt_name=MEDIUM),
        "quantize": _node("SD35FP8QuantizeModel", model=["ckpt", 0], **FP8, protect_patterns=""),
        "save": _node("SD35FP8SaveModel", model=["quantize", 0], filename_prefix="diffusion_models/sd3.5_medium_fp8",
                      layout="stock_compatible"),
        "report": _node("PreviewAny", "Quantization report", source=["quantize", 1]),
    }


def fp8_with_lora() -> dict:
    graph = _txt2img(LARGE, "sd35_large", "sd35_fp8/lora")
    graph["lora"] = _node("LoraLoaderModelOnly", model=["loader", 0], lora_name="sd3.5_large_lora.safetensors",
                          strength_model=1.0)
    graph["sampler"]["inputs"]["model"] = ["lora", 0]
    return graph


def hardware_aware() -> dict:
    graph = _txt2img(MEDIUM, "sd35_medium", "sd35_fp8/hardware_aware", steps=40, skip="7,8,9")
    graph["hardware"] = _node("SD35FP8HardwareInfo", device="auto")
    graph["capability"] = _node("PreviewAny", "FP8 capability", source=["hardware", 0])
    graph["recommended"] = _node("PreviewAny", "compute=auto will use", source=["hardware", 2])
    return graph


def memory_budget() -> dict:
    """Large on a 12 GB card: the weights fill 10.5 GiB (FP8 alone is 7.64 GiB), 16-bit where it buys the most."""
    graph = _txt2img(LARGE, "sd35_large", "sd35_fp8/memory_budget")
    graph["loader"]["inputs"]["memory_budget"] = "10.5"
    graph["loader"]["_meta"]["title"] = "Load SD3.5 Checkpoint (FP8, weights in 10.5 GiB)"
    return graph


WORKFLOWS = {
    "sd35_fp8_txt2img": partial(_txt2img, LARGE, "sd35_large", "sd35_fp8/txt2img"),
    "sd35_fp8_ab_compare": ab_fp16_vs_fp8,
    "sd35_fp8_medium_skip_layer_guidance": partial(_txt2img, MEDIUM, "sd35_medium", "sd35_fp8/medium_slg", steps=40,
                                                   skip="7,8,9"),
    "sd35_fp8_large_turbo_4_steps": partial(_txt2img, TURBO, "sd35_large_turbo", "sd35_fp8/turbo", steps=4, cfg=1.0),
    "sd35_fp8_quantize_and_save": quantize_and_save,
    "sd35_fp8_lora": fp8_with_lora,
    "sd35_fp8_hardware_aware": hardware_aware,
    "sd35_fp8_large_memory_budget": memory_budget,
}
