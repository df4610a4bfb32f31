"""API-format prompt builders for the integration tests (stock nodes and ours)."""

from __future__ import annotations


def txt2img(ckpt_name: str, seed: int = 7, steps: int = 3, size: int = 64, prefix: str = "stock") -> dict:
    """Stock SD3 txt2img: CheckpointLoaderSimple, CLIPTextEncode x2, KSampler, VAEDecode, SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red fox in the snow"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def encode(ckpt_node: str, clip_out: int = 1) -> dict:
    """Positive/negative CLIPTextEncode nodes "p" and "n" on a loader's CLIP output."""
    return {
        "p": {"class_type": "CLIPTextEncode", "inputs": {"clip": [ckpt_node, clip_out], "text": "a red fox"}},
        "n": {"class_type": "CLIPTextEncode", "inputs": {"clip": [ckpt_node, clip_out], "text": "blurry"}},
        "lat": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def ksampler(model: list, seed: int = 7, steps: int = 3, cfg: float = 4.5, sampler: str = "euler",
             scheduler: str = "sgm_uniform") -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["p", 0], "negative": ["n", 0], "latent_image": ["lat", 0], "seed": seed,
        "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}


def our_sampler(model: list, preset: str = "custom", seed: int = 7, steps: int = 3, cfg: float = 4.5,
                shift: float = 3.0, sampler: str = "euler", scheduler: str = "sgm_uniform", **skip) -> dict:
    return {"class_type": "SD35FP8Sampler", "inputs": {
        "model": model, "positive": ["p", 0], "negative": ["n", 0], "latent_image": ["lat", 0], "seed": seed,
        "preset": preset, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "shift": shift, "denoise": 1.0, **skip}}


def decode_and_preview(samples: list, vae: list, tag: str) -> dict:
    """VAEDecode + PreviewImage (an output node, so the branch executes)."""
    return {
        f"dec_{tag}": {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": vae}},
        f"out_{tag}": {"class_type": "PreviewImage", "inputs": {"images": [f"dec_{tag}", 0]}},
    }


def fp8_loader(ckpt_name: str, **overrides) -> dict:
    inputs = {"ckpt_name": ckpt_name, "fp8_format": "float8_e4m3fn", "scaling": "per_channel",
              "protect_preset": "auto", "compute": "auto", "text_encoder_fp8": "t5xxl_only"}
    inputs.update(overrides)
    return {"class_type": "SD35FP8CheckpointLoader", "inputs": inputs}


def dm_loader(model_name: str, **overrides) -> dict:
    inputs = {"model_name": model_name, "fp8_format": "float8_e4m3fn", "scaling": "per_channel",
              "protect_preset": "auto", "compute": "auto"}
    inputs.update(overrides)
    return {"class_type": "SD35FP8DiffusionModelLoader", "inputs": inputs}


def quantize_model(model: list, **overrides) -> dict:
    inputs = {"model": model, "fp8_format": "float8_e4m3fn", "scaling": "per_channel", "protect_preset": "auto",
              "compute": "auto"}
    inputs.update(overrides)
    return {"class_type": "SD35FP8QuantizeModel", "inputs": inputs}


def show(source: list) -> dict:
    """PreviewAny: an output node, so a branch ending in a STRING (a report) executes."""
    return {"class_type": "PreviewAny", "inputs": {"source": source}}
