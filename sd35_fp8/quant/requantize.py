"""Re-quantizing a patched FP8 weight (a LoRA merged into it) with a fresh scale.

Pure tensor math, like formats.py. Re-quantizing with the weight's old scale clips every value a patch
pushes past the old range; a fresh absmax scale never clips. A row (or tensor) whose range the patch left
exactly as it was keeps its old scale, so an untouched row, and a patch of strength 0, keep their exact bits.
"""

from __future__ import annotations

import torch

from .formats import fp8_max, quantize_with_scale


@torch.no_grad()
def fresh_scale(weight: torch.Tensor, old_scale: torch.Tensor, fmt: str = "float8_e4m3fn") -> torch.Tensor:
    """The absmax scale of `weight`, shaped like `old_scale` (per row if that is [out, 1], else one value),
    with `old_scale` kept where `weight`'s range is the one `old_scale` covers (absmax == old_scale * max)."""
    limit = fp8_max(fmt)
    per_row = old_scale.dim() == 2 and weight.dim() == 2 and old_scale.shape[0] == weight.shape[0] > 1
    if per_row:
        absmax = torch.maximum(weight.amax(dim=1, keepdim=True), weight.amin(dim=1, keepdim=True).neg()).float()
    else:
        absmax = torch.maximum(weight.amax(), weight.amin().neg()).float()
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("a patched (LoRA) weight holds NaN/Inf values; check the LoRA file and its strength")
    old = old_scale.to(device=weight.device, dtype=torch.float32).reshape(absmax.shape)
    scale = (absmax / limit).clamp_(min=torch.finfo(torch.float32).tiny)
    scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
    return torch.where(absmax == old * limit, old, scale).reshape(old_scale.shape)


def requantize(weight: torch.Tensor, old_scale: torch.Tensor,
               fmt: str = "float8_e4m3fn") -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scale) of a patched real-valued weight, with `fresh_scale`, rounded to nearest."""
    scale = fresh_scale(weight, old_scale, fmt)
    return quantize_with_scale(weight, scale, fmt), scale
