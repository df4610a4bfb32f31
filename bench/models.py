"""The denoisers compared: ComfyUI's own MMDiT class at full width, and its FP8 variants.

- `reference`: float32 compute on float16-representable random weights (the "FP16" model on a CPU).
- `ours`: quant.quantize (native backend) on the Linear layers the policy selects.
- `quanto`: optimum-quanto qfloat8 weights (quantize + freeze) with the same protection policy.
- `comfy_cast`: ComfyUI's `fp8_e4m3fn` weight dtype: the model built with dtype float8_e4m3fn and
  `comfy.ops.manual_cast` operations, exactly as its loader does (every weight, bias, norm and the
  pos_embed buffer cast to FP8 without a scale; cast back to the compute dtype in forward).
The FP8 variants share every tensor they do not replace with the reference, so several can be held
side by side at the cost of their FP8 weights only.
"""

from __future__ import annotations

import copy

import torch

from quant.config import QuantConfig
from quant.policy import resolve_policy
from quant.quantize import quantize, quantize_tables
from quant.report import Report

from .weights import fill_

CONTEXT_TOKENS = 154  # CLIP-L/G (77) + T5-XXL (77) tokens, as SD3.5's text encoders give
CONTEXT_DIM = 4096
POOLED_DIM = 2048
LATENT_CHANNELS = 16


def _tiny_sd35():
    from tools import tiny_sd35

    return tiny_sd35


def depth_of(variant: str) -> int:
    """Number of joint blocks of the full-size architecture."""
    return _tiny_sd35().FULL_SIZE[variant]["depth"]


def meta_model(variant: str, depth: int | None = None, dtype: torch.dtype = torch.float16,
               operations=None) -> torch.nn.Module:
    """The architecture on the meta device (shapes only, no memory)."""
    tiny = _tiny_sd35()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    return MMDiT(**tiny.mmdit_kwargs(variant, depth), device="meta", dtype=dtype,
                 operations=operations or comfy.ops.disable_weight_init)


def reference(variant: str, depth: int, kind: str, seed: int = 0) -> torch.nn.Module:
    """Full-width MMDiT with `depth` blocks, float32, weights drawn as `kind` (see bench.weights)."""
    model = _tiny_sd35().build_mmdit(variant, device="cpu", dtype=torch.float32, depth=depth)
    return fill_(model, kind, seed).eval()


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """New module objects, same tensors: quantizing the copy in place leaves `model` as it is."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def ours(model: torch.nn.Module, config: QuantConfig | None = None, policy=None) -> torch.nn.Module:
    config = config or QuantConfig(compute="weight_only")
    return quantize(sharing_copy(model), config, policy=policy, inplace=True)[0].eval()


def quanto(model: torch.nn.Module) -> torch.nn.Module:
    """optimum-quanto qfloat8 (quantize + freeze) on exactly the Linear layers our default policy quantizes, and
    pos_embed in FP8 (scale 1.0) as ours: the same protection policy, so the comparison is of the FP8 math.

    Called directly rather than through quant's quanto backend: that backend excludes protected Linear layers
    only, so quanto also converts the x_embedder Conv2d, which would not be the same protection policy.
    """
    from optimum.quanto import freeze, qfloat8_e4m3fn
    from optimum.quanto import quantize as quanto_quantize

    target = sharing_copy(model)
    policy = resolve_policy(QuantConfig(), {k: tuple(v.shape) for k, v in model.state_dict().items()})
    chosen = {n for n, m in target.named_modules()
              if isinstance(m, torch.nn.Linear) and policy.should_quantize(n, tuple(m.weight.shape))}
    exclude = [n for n, m in target.named_modules() if n and n not in chosen and not list(m.children())]
    quanto_quantize(target, weights=qfloat8_e4m3fn, exclude=exclude)
    freeze(target)
    quantize_tables(target, policy, "float8_e4m3fn", Report())
    return target.eval()


def comfy_cast(model: torch.nn.Module, variant: str, depth: int) -> torch.nn.Module:
    """ComfyUI's fp8_e4m3fn weight dtype with manual cast, holding `model`'s values cast to FP8."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    cast = MMDiT(**_tiny_sd35().mmdit_kwargs(variant, depth), device="meta", dtype=torch.float8_e4m3fn,
                 operations=comfy.ops.manual_cast)
    cast = cast.to_empty(device="cpu")
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
