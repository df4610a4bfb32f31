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

# Elements per chunk when quantizing on the CPU: the float32 working copy of a chunk (4 MiB) stays in
# cache while it is scaled and cast, so a weight is read from memory once and its FP8 copy written once.
# Other devices take much larger chunks (fewer kernel launches); both bound the temporaries.
_CPU_CHUNK_ELEMENTS = 1 << 20
_DEVICE_CHUNK_ELEMENTS = 1 << 24


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


def _absmax(weight: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |w| (over `dim`, kept) in float32, as max(max w, -min w): no |w| temporary. NaN propagates."""
    if dim is None:
        return torch.maximum(weight.amax(), weight.amin().neg()).float()
    return torch.maximum(weight.amax(dim=dim, keepdim=True), weight.amin(dim=dim, keepdim=True).neg_()).float()


def _scale_from_absmax(absmax: torch.Tensor, limit: float) -> torch.Tensor:
    """absmax / limit, 1.0 for all-zero rows, and never below float32's smallest normal number: a row of
    values under ~5e-36 would otherwise get a zero (or subnormal) scale and dequantize to NaN/Inf."""
    scale = (absmax / limit).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def compute_scale(weight: torch.Tensor, fmt: str = "float8_e4m3fn", scaling: str = "per_channel") -> torch.Tensor:
    """float32 absmax scale: [out, 1] for per_channel, [] for per_tensor.

    An all-zero row (or tensor) gets scale 1.0, so dequantization gives exact zeros
    and nothing divides by zero.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling: {scaling!r} is not supported; use one of {list(SCALINGS)}")
    if weight.dim() != 2 and scaling == "per_channel":
        raise ValueError(f"per_channel scaling needs a 2-D weight, got shape {tuple(weight.shape)}")
    absmax = _absmax(weight, 1 if scaling == "per_channel" else None)
    return _scale_from_absmax(absmax, fp8_max(fmt))


def _chunk_rows(weight: torch.Tensor) -> int:
    budget = _CPU_CHUNK_ELEMENTS if weight.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    return max(1, budget // max(1, weight[0].numel()))


def _scale_into(out: torch.Tensor, buf: torch.Tensor, chunk: torch.Tensor, scale: torch.Tensor,
                limit: float | None) -> None:
    """out = fp8(chunk / scale) through the float32 buffer `buf` (same shape as chunk); clamp if `limit`."""
    buf.copy_(chunk)
    buf.div_(scale)
    if limit is not None:
        buf.clamp_(-limit, limit)
    out.copy_(buf)


def _quantize_chunks(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, limit: float | None,
                     rows_scale: bool) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    if weight.numel() == 0:
        return out
    if weight.dim() == 0:
        _scale_into(out, torch.empty((), device=weight.device), weight, scale, limit)
        return out
    step = _chunk_rows(weight)
    buf = torch.empty((min(step, weight.shape[0]), *weight.shape[1:]), device=weight.device)
    for start in range(0, weight.shape[0], step):
        chunk = weight[start:start + step]
        row_scale = scale[start:start + step] if rows_scale else scale
        _scale_into(out[start:start + step], buf[: chunk.shape[0]], chunk, row_scale, limit)
    return out


def quantize_with_scale(weight: torch.Tensor, scale: torch.Tensor, fmt: str = "float8_e4m3fn") -> torch.Tensor:
    """weight / scale, saturated to the format's finite range, rounded to nearest.

    Works chunk by chunk over rows so a 2432x9728 layer never needs a full float32 copy.
    """
    dtype = fp8_dtype(fmt)
    scale = scale.to(device=weight.device, dtype=torch.float32)
    rows_scale = scale.dim() > 0 and weight.dim() > 0 and scale.shape[0] == weight.shape[0] and scale.shape[0] > 1
    return _quantize_chunks(weight, scale, dtype, fp8_max(dtype), rows_scale)


def _quantize_per_channel(weight: torch.Tensor, dtype: torch.dtype, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-row absmax, scale and cast, one cache-sized chunk of rows at a time.

    No clamp is needed: dividing by fl(absmax / max) puts every value within a few float32 ulps of
    the format's max, which rounds to the max itself (the next FP8 value is far above).
    """
    limit = fp8_max(dtype)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    scale = torch.empty((weight.shape[0], 1), dtype=torch.float32, device=weight.device)
    step = _chunk_rows(weight)
    buf = torch.empty((min(step, weight.shape[0]), weight.shape[1]), device=weight.device)
    for start in range(0, weight.shape[0], step):
        chunk = weight[start:start + step]
        absmax = _absmax(chunk, 1)
        if not bool(torch.isfinite(absmax).all()):
            _check_finite(weight, name)
        row_scale = scale[start:start + step]
        row_scale.copy_(_scale_from_absmax(absmax, limit))
        _scale_into(out[start:start + step], buf[: chunk.shape[0]], chunk, row_scale, None)
    return out, scale


def quantize_weight(
    weight: torch.Tensor,
    fmt: str = "float8_e4m3fn",
    scaling: str = "per_channel",
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight to (fp8 tensor, float32 scale).

    `name` only labels errors: a weight with NaN/Inf is refused, naming the layer.
    """
    dtype = fp8_dtype(fmt)
    if is_fp8(weight):
        raise ValueError(f"{name}: weight is already {weight.dtype}; dequantize it before quantizing again")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: cannot quantize a {weight.dtype} tensor")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling: {scaling!r} is not supported; use one of {list(SCALINGS)}")
    if weight.numel() == 0:  # a 0-width layer: nothing to scale
        shape = (weight.shape[0], 1) if scaling == "per_channel" and weight.dim() == 2 else ()
        return torch.empty(weight.shape, dtype=dtype, device=weight.device), torch.ones(shape, device=weight.device)
    if scaling == "per_channel" and weight.dim() == 2:
        return _quantize_per_channel(weight, dtype, name)
    if not bool(torch.isfinite(_absmax(weight)).all()):
        _check_finite(weight, name)
    scale = compute_scale(weight, fmt, scaling)
    return _quantize_chunks(weight, scale, dtype, None, scaling == "per_channel"), scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 weight * scale in `dtype` (the scale broadcasts: [out, 1] or []), scaled in place: one allocation."""
    out = qweight.to(dtype)
    scale = scale.to(device=qweight.device, dtype=dtype)
    if torch.broadcast_shapes(out.shape, scale.shape) != out.shape:
        return out * scale
    return out.mul_(scale)


def plain_cast(weight: torch.Tensor, fmt: str = "float8_e4m3fn") -> torch.Tensor:
    """The baseline we beat: a bare cast with no scale (what ComfyUI's fp8 weight dtype does)."""
    return weight.to(fp8_dtype(fmt))


def _flat_chunks(*tensors: torch.Tensor):
    """Matching 1-D chunks of same-sized tensors, cache-sized on the CPU."""
    flat = [t.reshape(-1) for t in tensors]
    step = _CPU_CHUNK_ELEMENTS if tensors[0].device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    for start in range(0, flat[0].numel(), step):
        yield tuple(f[start:start + step] for f in flat)


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference|| / ||reference|| in float64 (0.0 for an all-zero reference), chunk by chunk."""
    approx = approx.expand_as(reference)
    num = den = 0.0
    for ref, app in _flat_chunks(reference, approx):
        ref = ref.double()
        den += float(ref.square().sum())
        num += float((app.double() - ref).square_().sum())
    return (num / den) ** 0.5 if den > 0 else num**0.5


def quantization_error(weight: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> float:
    """relative_error(weight, dequantize_weight(qweight, scale)) without materialising the dequantized weight."""
    if scale.dim() == 0 or weight.dim() != 2:
        return relative_error(weight, dequantize_weight(qweight, scale))
    num = den = 0.0
    step = _chunk_rows(weight)
    for start in range(0, weight.shape[0], step):
        ref = weight[start:start + step].double()
        app = dequantize_weight(qweight[start:start + step], scale[start:start + step], torch.float64)
        den += float(ref.square().sum())
        num += float(app.sub_(ref).square_().sum())
    return (num / den) ** 0.5 if den > 0 else num**0.5
