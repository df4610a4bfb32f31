"""The `memory_budget` input: parsed by the engine (quant.budget), `auto` resolved against ComfyUI's device.

auto = ComfyUI's free memory on its device (`get_free_memory`, plus what the input model already holds there)
minus what sampling SD3.5 at 1024x1024 with cfg needs by ComfyUI's own estimate for the model
(`BaseModel.memory_required` on quant.budget.SAMPLING_LATENT) minus a margin: quant.budget.auto_budget, the rule
the CLI's `--budget auto` follows too (which, with no ComfyUI to ask, measures free memory itself and uses ComfyUI
0.8's estimate for its device: quant.budget.sampling_bytes).
"""

from __future__ import annotations

import comfy.model_detection
import comfy.model_management
import torch
from comfy_api.v0_0_2 import io

from ..quant.budget import SAMPLING_LATENT, auto_budget, parse_budget


def memory_budget_input() -> io.String.Input:
    return io.String.Input("memory_budget", default="", optional=True,
                           tooltip="Fit the diffusion model's weights in this much memory, keeping 16-bit the layers "
                                   "where 16-bit buys the most. Empty or off: the preset decides (default). auto: "
                                   "what ComfyUI's device has free after sampling at 1024x1024. A number: GiB, e.g. "
                                   "10.5. The report lists what stayed 16-bit and the predicted error.")


def resolve_budget(text: str, base_model=None, shapes: dict[str, tuple[int, ...]] | None = None,
                   model_prefix: str = "", already_loaded: int = 0) -> int | None:
    """Bytes for the weights, or None. For auto, ComfyUI's memory estimate comes from `base_model` (a loaded
    model's BaseModel) or is built on the meta device from the file's `shapes`."""
    value = parse_budget(text)
    if value != "auto":
        return value
    if base_model is None:
        meta = {k: torch.empty(s, device="meta") for k, s in (shapes or {}).items()}
        config = comfy.model_detection.model_config_from_unet(meta, model_prefix)
        if config is None:
            raise ValueError("memory_budget: auto needs a model ComfyUI recognises; give a number of GiB instead")
        base_model = config.get_model(meta, model_prefix, device="meta")
    device = comfy.model_management.get_torch_device()
    free = comfy.model_management.get_free_memory(device) + already_loaded
    return auto_budget(free, int(base_model.memory_required(list(SAMPLING_LATENT))), f"{device} (ComfyUI's estimate)")
