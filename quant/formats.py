"""FP8 number formats and the absmax-scaled quantize/dequantize math.

Pure tensor math: no modules, no files, never imports comfy. Everything else in
quant/ builds on `quantize_weight` and `dequantize_weight`.

Convention (the same as ComfyUI's `weight_scale`): real_weight = fp8_weight * scale,
with `scale` float32 of shape [out, 1] (per output channel) or [] (per tensor).
"""

from __future__ import annotations

import torch

FP8_DTYPES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
SCALINGS: tuple[str, ...] = ("per_channel", "per_tensor")

# Rows per chunk when quantizing: bounds the float32 temporaries to a few MB
# whatever the layer size, which is also what keeps the fused path cache-friendly.
_CHUNK_ELEMENTS = 1 << 22


def fp8_dtype(fmt: str) -> torch.dtype:
    """The torch dtype for a format name; a clear error for anything else."""
    try:
        return FP8_DTYPES[fmt]
    except KeyError:
        raise ValueError(
            f"fp8_format: {fmt!r} is not a supported FP8 format; use one of {sorted(FP8_DTYPES)}"
        ) from None


def fp8_max(fmt: str | torch.dtype) -> float:
    """Largest finite value of the format (448 for e4m3fn, 57344 for e5m2)."""
    dtype = fp8_dtype(fmt) if isinstance(fmt, str) else fmt
    return float(torch.finfo(dtype).max)


def format_name(dtype: torch.dtype) -> str:
    """Inverse of `fp8_dtype`."""
    for name, candidate in FP8_DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"{dtype} is not an FP8 dtype")


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FP8_DTYPES.values()


def _check_finite(weight: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"{name}: weight holds {bad} NaN/Inf value(s); this checkpoint is damaged. "
            f"Re-download it, or add {name.removesuffix('.weight')!r} to protect_patterns to keep it as is."
        )


def compute_scale(weight: torch.Tensor, fmt: str = "float8_e4m3fn", scaling: str = "per_channel") -> torch.Tensor:
    """float32 absmax scale: [out, 1] for per_channel, [] for per_tensor.

    An all-zero row (or tensor) gets scale 1.0, so dequantization gives exact zeros
    and nothing divides by zero.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling: {scaling!r} is not supported; use one of {list(SCALINGS)}")
    if weight.dim() != 2 and scaling == "per_channel":
        raise ValueError(f"per_channel scaling needs a 2-D weight, got shape {tuple(weight.shape)}")
    if scaling == "per_channel":
        absmax = weight.abs().amax(dim=1, keepdim=True).float()
    else:
        absmax = weight.abs().amax().float()
    scale = absmax / fp8_max(fmt)
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def quantize_with_scale(weight: torch.Tensor, scale: torch.Tensor, fmt: str = "float8_e4m3fn") -> torch.Tensor:
    """weight / scale, saturated to the format's finite range, rounded to nearest.

    Works chunk by chunk over rows so a 2432x9728 layer never needs a full float32 copy.
    """
    dtype = fp8_dtype(fmt)
    limit = fp8_max(dtype)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    if weight.numel() == 0:
        return out
    rows = weight.shape[0] if weight.dim() > 0 else 1
    row_elems = max(1, weight.numel() // max(rows, 1))
    step = max(1, _CHUNK_ELEMENTS // row_elems)
    if weight.dim() == 0 or scale.dim() == 0:
        inv = scale.reciprocal()
        for start in range(0, rows, step):
            chunk = weight[start:start + step] if weight.dim() else weight
            out_view = out[start:start + step] if weight.dim() else out
            out_view.copy_((chunk.float() * inv).clamp_(-limit, limit))
        return out
    for start in range(0, rows, step):
        chunk = weight[start:start + step].to(torch.float32, copy=True)  # never divide the caller's tensor
        chunk.div_(scale[start:start + step]).clamp_(-limit, limit)
        out[start:start + step].copy_(chunk)
    return out


def quantize_weight(
    weight: torch.Tensor,
    fmt: str = "float8_e4m3fn",
    scaling: str = "per_channel",
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight to (fp8 tensor, float32 scale).

    `name` only labels errors: a weight with NaN/Inf is refused, naming the layer.
    """
    fp8_dtype(fmt)
    if is_fp8(weight):
        raise ValueError(f"{name}: weight is already {weight.dtype}; dequantize it before quantizing again")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: cannot quantize a {weight.dtype} tensor")
    _check_finite(weight, name)
    scale = compute_scale(weight, fmt, scaling)
    return quantize_with_scale(weight, scale, fmt), scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 weight * scale in `dtype` (the scale broadcasts: [out, 1] or [])."""
    return qweight.to(dtype) * scale.to(device=qweight.device, dtype=dtype)


def plain_cast(weight: torch.Tensor, fmt: str = "float8_e4m3fn") -> torch.Tensor:
    """The baseline we beat: a bare cast with no scale (what ComfyUI's fp8 weight dtype does)."""
    return weight.to(fp8_dtype(fmt))


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference|| / ||reference|| in float64 (0.0 for an all-zero reference)."""
    ref = reference.double()
    denom = float(ref.norm())
    diff = float((approx.double() - ref).norm())
    return diff / denom if denom > 0 else diff
