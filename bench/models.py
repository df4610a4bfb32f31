"""The denoisers compared: ComfyUI's own MMDiT class at full width, and its FP8 variants.

The FP8 variants share every tensor they do not replace with the reference, so several can be held side by side at
the cost of their FP8 weights only.
"""

from __future__ import annotations

import copy

import torch

from sd35_fp8.quant.config import QuantConfig
from sd35_fp8.quant.quantize import quantize
from tools import tiny_sd35

from .weights import fill_

CONTEXT_TOKENS = 154  # CLIP-L/G (77) + T5-XXL (77) tokens, as SD3.5's text encoders give
CONTEXT_DIM = 4096
POOLED_DIM = 2048
LATENT_CHANNELS = 16


def depth_of(variant: str) -> int:
    """Number of joint blocks of the full-size architecture."""
    return tiny_sd35.FULL_SIZE[variant]["depth"]


def meta_model(variant: str, depth: int | None = None, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """The architecture on the meta device (shapes only, no memory)."""
    return tiny_sd35.build_mmdit(variant, device="meta", dtype=dtype, depth=depth)


def reference(variant: str, depth: int | None, kind: str, seed: int = 0) -> torch.nn.Module:
    """The variant's MMDiT with `depth` blocks (None: all), float32 compute on float16-representable weights drawn
    as `kind` (see bench.weights): the "FP16" model on a CPU."""
    model = tiny_sd35.build_mmdit(variant, device="cpu", dtype=torch.float32, depth=depth)
    return fill_(model, kind, seed).eval()


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """New module objects, same tensors: quantizing the copy in place leaves `model` as it is."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def ours(model: torch.nn.Module, config: QuantConfig | None = None, policy=None) -> torch.nn.Module:
    """quant.quantize (weight_only unless `config` says otherwise) on the Linear layers the policy selects."""
    config = config or QuantConfig(compute="weight_only")
    return quantize(sharing_copy(model), config, policy=policy, inplace=True)[0].eval()


def quanto(model: torch.nn.Module) -> torch.nn.Module:
    """optimum-quanto qfloat8 (quantize + freeze) on exactly the Linear layers our default policy quantizes, and
    pos_embed in FP8 (scale 1.0) as ours: the same plan, so the comparison is of the FP8 math."""
    return ours(model, QuantConfig(backend="quanto", compute="weight_only"))


def comfy_cast(model: torch.nn.Module, variant: str, depth: int) -> torch.nn.Module:
    """ComfyUI's `fp8_e4m3fn` weight dtype built as its loader does, holding `model`'s values: every weight, bias,
    norm and the pos_embed buffer cast to FP8 without a scale, cast back to the compute dtype in forward."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    cast = MMDiT(**tiny_sd35.mmdit_kwargs(variant, depth), device="meta", dtype=torch.float8_e4m3fn,
                 operations=comfy.ops.manual_cast).to_empty(device="cpu")
    cast.load_state_dict(model.state_dict())
    return cast.eval()


def inputs(pixels: int, seed: int = 0, batch: int = 1) -> dict[str, torch.Tensor]:
    """Noisy latents for `pixels` x `pixels` images, timesteps, T5/CLIP-like contexts and pooled vectors.

    One sample sits at timestep 750; a batch spreads its samples over 900..100, so an error figure
    averages over the whole trajectory rather than one modulation vector.
    """
    gen = torch.Generator().manual_seed(seed)
    side = pixels // 8
    return {
        "x": torch.randn(batch, LATENT_CHANNELS, side, side, generator=gen),
        "t": torch.full((1,), 750.0) if batch == 1 else torch.linspace(900.0, 100.0, batch),
        "context": torch.randn(batch, CONTEXT_TOKENS, CONTEXT_DIM, generator=gen),
        "y": torch.randn(batch, POOLED_DIM, generator=gen),
    }


def forward(model: torch.nn.Module, inp: dict[str, torch.Tensor], x: torch.Tensor | None = None,
            t: torch.Tensor | None = None) -> torch.Tensor:
    """One denoiser call (MMDiT.forward(x, t, y, context)), in inference mode."""
    with torch.inference_mode():
        return model(inp["x"] if x is None else x, inp["t"] if t is None else t, y=inp["y"], context=inp["context"])
