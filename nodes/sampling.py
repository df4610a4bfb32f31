"""SD3.5 Sampler: KSampler with SD3.5's recommended settings, shift and skip-layer guidance in one node.

Built from ComfyUI's own pieces (ModelSamplingSD3, SkipLayerGuidanceSD3, common_ksampler),
so with the same settings it gives exactly what the stock nodes give, with the
usual progress bar, latent previews and interrupt.
"""

from __future__ import annotations

import re
import time

import comfy.model_management
import comfy.samplers
import psutil
import torch
from comfy_api.v0_0_2 import io

from ..quant.config import check_choice
from .common import CATEGORY, PackNode

# Recommended settings. Sources: the Hugging Face model cards of stabilityai/stable-diffusion-3.5-large
# (28 steps, guidance 3.5), -medium (40 steps, guidance 4.5) and -large-turbo (4 steps, guidance 0-1), and
# Stability AI's reference repo sd3.5 (shift 3.0; Medium skip-layer guidance on layers 7,8,9 at scale 2.5
# from 1% to 20% of sampling).
SAMPLER_PRESETS: dict[str, dict] = {
    "sd35_large": {"steps": 28, "cfg": 3.5, "sampler_name": "dpmpp_2m", "scheduler": "sgm_uniform", "shift": 3.0,
                   "skip_layers": ""},
    "sd35_medium": {"steps": 40, "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "sgm_uniform", "shift": 3.0,
                    "skip_layers": "7,8,9", "skip_scale": 2.5, "skip_start": 0.01, "skip_end": 0.20},
    "sd35_large_turbo": {"steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "sgm_uniform", "shift": 3.0,
                         "skip_layers": ""},
}


PRESETS_KEY = "sd35_fp8_presets"  # the preset table, sent with the input's definition to the frontend extension


def preset_input() -> io.Combo.Input:
    """The preset choice, carrying the preset table: web/sd35_fp8.js fills the widgets from it when a preset is
    picked, so the values on the canvas are the values used (the server applies them to API prompts too)."""
    preset = io.Combo.Input("preset", options=["custom", *SAMPLER_PRESETS], default="custom",
                            tooltip="custom: use the widgets below. Other presets set steps, cfg, sampler, scheduler, "
                                    "shift and skip-layer guidance to Stability AI's recommendations; picking one "
                                    "fills the widgets with them.")
    preset.extra_dict = {**preset.extra_dict, PRESETS_KEY: SAMPLER_PRESETS}  # 0.3.75's Combo takes no extra_dict
    return preset


def parse_skip_layers(text: str) -> list[int]:
    """'7, 8,9' -> [7, 8, 9]; anything but integers and separators is an error naming the input."""
    text = text.strip()
    if not text:
        return []
    if not re.fullmatch(r"\d+(\s*[,\s]\s*\d+)*", text):
        raise ValueError(f"skip_layers: {text!r} is not a list of block numbers; write it like 7,8,9 or leave it empty")
    return [int(v) for v in re.findall(r"\d+", text)]


class SD35FP8Sampler(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35FP8Sampler",
            display_name="SD3.5 Sampler",
            category=f"{CATEGORY}/sampling",
            description="Samples an SD3.5 model. Presets fill in Stability AI's recommended steps, cfg, sampler, "
                        "shift 3.0 and (Medium) skip-layer guidance; 'custom' uses the widgets. Equivalent to "
                        "ModelSamplingSD3 (+ SkipLayerGuidanceSD3) + KSampler, with timing and memory stats.",
            inputs=[
                io.Model.Input("model", tooltip="An SD3.5 model (FP8 or 16-bit)."),
                io.Conditioning.Input("positive", tooltip="What the image should show."),
                io.Conditioning.Input("negative", tooltip="What it should not show."),
                io.Latent.Input("latent_image", tooltip="Start latent, e.g. EmptySD3LatentImage."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed: the same seed gives the same image."),
                preset_input(),
                io.Int.Input("steps", default=28, min=1, max=10000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="dpmpp_2m",
                               tooltip="Sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="sgm_uniform",
                               tooltip="Noise schedule."),
                io.Float.Input("shift", default=3.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Timestep shift (ModelSamplingSD3); SD3.5 is trained for 3.0. Above 0 (0 "
                                       "collapses every sigma to 0: an all-NaN image)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 for txt2img; lower keeps more of the input latent."),
                io.String.Input("skip_layers", default="", optional=True,
                                tooltip="Skip-layer guidance blocks, e.g. 7,8,9 (SD3.5 Medium). Empty: off."),
                io.Float.Input("skip_scale", default=3.0, min=0.0, max=10.0, step=0.1, optional=True,
                               tooltip="Strength of skip-layer guidance."),
                io.Float.Input("skip_start", default=0.01, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Fraction of sampling where skip-layer guidance starts."),
                io.Float.Input("skip_end", default=0.15, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Fraction of sampling where skip-layer guidance ends."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The denoised latent."),
                     io.String.Output(display_name="stats",
                                      tooltip="Settings used, total seconds, seconds per step, peak memory.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, preset, steps, cfg, sampler_name, scheduler,
                shift, denoise, skip_layers="", skip_scale=3.0, skip_start=0.01, skip_end=0.15) -> io.NodeOutput:
        import nodes
        from comfy_extras.nodes_model_advanced import ModelSamplingSD3
        from comfy_extras.nodes_sd3 import SkipLayerGuidanceSD3

        check_choice("preset", preset, ["custom", *SAMPLER_PRESETS])
        settings = {"steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler, "shift": shift,
                    "skip_layers": skip_layers, "skip_scale": skip_scale, "skip_start": skip_start,
                    "skip_end": skip_end, **SAMPLER_PRESETS.get(preset, {})}
        if settings["skip_start"] >= settings["skip_end"] and settings["skip_layers"].strip():
            raise ValueError(f"skip_start ({settings['skip_start']}) must be below skip_end ({settings['skip_end']})")
        layers = parse_skip_layers(settings["skip_layers"])
        notes = []
        depth = len(getattr(model.model.diffusion_model, "joint_blocks", []))
        missing = [i for i in layers if depth and i >= depth]
        if missing:
            if preset == "custom":
                raise ValueError(f"skip_layers: block(s) {missing} do not exist in this {depth}-block model; use "
                                 f"numbers from 0 to {depth - 1} (SD3.5 Medium: 7,8,9) or leave it empty")
            notes.append(f"skip layers {missing} do not exist in this {depth}-block model")

        patched = ModelSamplingSD3().patch(model, settings["shift"])[0]
        if layers:
            patched = SkipLayerGuidanceSD3.execute(model=patched, layers=",".join(map(str, layers)),
                                                   scale=settings["skip_scale"], start_percent=settings["skip_start"],
                                                   end_percent=settings["skip_end"]).result[0]
        device = comfy.model_management.get_torch_device()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        latent = nodes.common_ksampler(patched, seed, settings["steps"], settings["cfg"], settings["sampler_name"],
                                       settings["scheduler"], positive, negative, latent_image, denoise=denoise)[0]
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            memory = f"peak VRAM {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (max allocated)"
        else:
            memory = f"process RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB"
        used = ", ".join(f"{k}={v}" for k, v in settings.items() if layers or not k.startswith("skip"))
        stats = [f"preset {preset}: {used}",
                 f"{seconds:.2f} s total, {seconds / settings['steps']:.3f} s/step, {memory}",
                 *notes]
        return io.NodeOutput(latent, "\n".join(stats))
