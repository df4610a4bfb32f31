"""FP8 number formats and the absmax-scaled quantize/dequantize math.

Pure tensor math: no modules, no files, never imports comfy. Everything else in
quant/ builds on `quantize_weight` and `dequantize_weight`.

Convention (the same as ComfyUI's `weight_scale`): real_weight = fp8_weight * scale,
with `scale` float32 of shape [out, 1] (per output channel) or [] (per tensor).
"""

from __future__ import annotations

import math

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
_COMPARED_ROWS = 4096  # rows of a unit-scale table an absmax scale is tried on (quantize_unit_scale)


def fp8_dtype(fmt: str) -> torch.dtype:
    """The torch dtype for a format name; a clear error for anything else."""
    try:
        return FP8_DTYPES[fmt]
    except KeyError:
        raise ValueError(f"fp8_format: {fmt!r} is not a supported FP8 format; use one of {sorted(FP8_DTYPES)}") \
            from None


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
        raise ValueError(f"{name}: weight holds {bad} NaN/Inf value(s); this checkpoint is damaged. Re-download it, "
                         f"or add {name.removesuffix('.weight')!r} to protect_patterns to keep it as is.")


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


def _chunk_rows(weight: torch.Tensor) -> int:
    budget = _CPU_CHUNK_ELEMENTS if weight.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    return max(1, budget // max(1, weight[0].numel()))


class _ErrorSums:
    """||w||^2 and ||dequantize(q) - w||^2, summed chunk by chunk while the chunk is in cache.

    float32 norms per chunk (rows weighted by their scale), accumulated in Python floats: the report's
    relative error without a second pass over the weight (which cost 5x the quantization itself).
    """

    def __init__(self) -> None:
        self.ref = 0.0
        self.diff = 0.0

    def add(self, scaled: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor, work: torch.Tensor) -> None:
        """`scaled` = w / scale (float32, within the format's range, so its norms cannot overflow), `quantized`
        its FP8 copy, `work` a float32 scratch like `scaled`. Scales are applied to the norms in float64."""
        narrow, factor = _widenable(quantized)
        work.copy_(narrow)
        work.sub_(scaled, alpha=1.0 / factor)  # (q - w / scale) / factor: exact powers of two, one pass fewer
        dims = tuple(range(1, scaled.dim())) or None  # norms per row, summed in float64
        s = scale.reshape(-1).double()  # one scale, or one per row
        self.ref += float(((torch.linalg.vector_norm(scaled, dim=dims).double() * s) ** 2).sum())
        self.diff += float(((torch.linalg.vector_norm(work, dim=dims).double() * (s * factor)) ** 2).sum())

    @property
    def relative(self) -> float:
        return (self.diff / self.ref) ** 0.5 if self.ref > 0 else self.diff**0.5


@torch.no_grad()
def _quantize_chunks(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, limit: float | None,
                     errors: _ErrorSums | None = None, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8(weight / scale), scale), one cache-sized chunk of rows at a time through a float32 buffer (a 2432x9728
    layer never needs a full float32 copy), clamped to +-`limit` if given. `scale`: one value, one per row, or None
    for per-row absmax scales made chunk by chunk (fused with the cast: each chunk is read once).

    Absmax scales need no clamp: dividing by fl(absmax / max) puts every value within a few float32 ulps of the
    format's max, which rounds to the max itself (the next FP8 value is far above).
    """
    if weight.numel() == 0:
        return torch.empty(weight.shape, dtype=dtype, device=weight.device), scale
    if weight.dim() == 0:
        out, scale = _quantize_chunks(weight.reshape(1), scale, dtype, limit, errors, name)
        return out.reshape(()), scale
    per_row = scale is None
    if per_row:
        scale = torch.empty((weight.shape[0], 1), dtype=torch.float32, device=weight.device)
    rows_scale = scale.dim() > 0 and scale.shape[0] == weight.shape[0] and scale.shape[0] > 1
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    step = _chunk_rows(weight)
    buf = torch.empty((min(step, weight.shape[0]), *weight.shape[1:]), device=weight.device)
    work = torch.empty_like(buf) if errors is not None else None
    for start in range(0, weight.shape[0], step):
        chunk = weight[start:start + step]
        row_scale = scale[start:start + step] if rows_scale else scale
        if per_row:
            absmax = _absmax(chunk, 1)
            if not bool(torch.isfinite(absmax).all()):
                _check_finite(weight, name)
            row_scale.copy_(_scale_from_absmax(absmax, fp8_max(dtype)))
        scaled, fp8 = buf[:chunk.shape[0]], out[start:start + step]
        scaled.copy_(chunk)
        scaled.div_(row_scale)
        if limit is not None:
            scaled.clamp_(-limit, limit)
        fp8.copy_(scaled)
        if errors is not None:
            errors.add(scaled, fp8, row_scale, work[:chunk.shape[0]])
    return out, scale


def quantize_with_scale(weight: torch.Tensor, scale: torch.Tensor, fmt: str = "float8_e4m3fn") -> torch.Tensor:
    """weight / scale, saturated to the format's finite range, rounded to nearest."""
    dtype = fp8_dtype(fmt)
    scale = scale.to(device=weight.device, dtype=torch.float32)
    return _quantize_chunks(weight, scale, dtype, fp8_max(dtype))[0]


@torch.no_grad()
def fresh_scale(weight: torch.Tensor, old_scale: torch.Tensor, fmt: str = "float8_e4m3fn") -> torch.Tensor:
    """The scale to re-quantize a patched (LoRA-merged) real-valued `weight` with, shaped like the FP8 layer's
    `old_scale` (per row if that is [out, 1], else one value). Re-quantizing with the old scale would clip every value
    a patch pushes past the old range: such a row (or tensor) gets its absmax scale, as does one the patch shrank
    below half the old range. A row whose range still fits the old scale within a factor 2 keeps it (FP8 is floating
    point: in its top binade nothing is lost), so an untouched row, and a patch of strength 0, keep their exact bits
    whatever headroom the file's scales have (ours have none; other tools' may)."""
    per_row = old_scale.dim() == 2 and weight.dim() == 2 and old_scale.shape[0] == weight.shape[0] > 1
    absmax = _absmax(weight, 1 if per_row else None)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("a patched (LoRA) weight holds NaN/Inf values; check the LoRA file and its strength")
    limit = fp8_max(fmt)
    old = old_scale.to(device=weight.device, dtype=torch.float32).reshape(absmax.shape)
    fits = (absmax <= old * limit) & (absmax * 2 > old * limit)
    return torch.where(fits, old, _scale_from_absmax(absmax, limit)).reshape(old_scale.shape)


def requantize(weight: torch.Tensor, old_scale: torch.Tensor,
               fmt: str = "float8_e4m3fn") -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scale) of a patched real-valued weight, with `fresh_scale`, rounded to nearest."""
    scale = fresh_scale(weight, old_scale, fmt)
    return quantize_with_scale(weight, scale, fmt), scale


def quantize_weight(weight: torch.Tensor, fmt: str = "float8_e4m3fn", scaling: str = "per_channel",
                    name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight to (fp8 tensor, float32 scale).

    `name` only labels errors: a weight with NaN/Inf is refused, naming the layer.
    """
    return _quantize(weight, fmt, scaling, name, None)


def quantize_weight_with_error(weight: torch.Tensor, fmt: str = "float8_e4m3fn", scaling: str = "per_channel",
                               name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, float]:
    """`quantize_weight` plus the relative error ||dequantize(q, scale) - w|| / ||w|| for the report,
    summed in the same pass (float32 sums: agrees with `relative_error` to ~1e-5 relative)."""
    errors = _ErrorSums()
    qweight, scale = _quantize(weight, fmt, scaling, name, errors)
    return qweight, scale, errors.relative


def _quantize(weight: torch.Tensor, fmt: str, scaling: str, name: str,
              errors: _ErrorSums | None) -> tuple[torch.Tensor, torch.Tensor]:
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
    if scaling == "per_channel":
        if weight.dim() != 2:
            raise ValueError(f"per_channel scaling needs a 2-D weight, got shape {tuple(weight.shape)}")
        return _quantize_chunks(weight, None, dtype, None, errors, name)
    absmax = _absmax(weight)
    if not bool(torch.isfinite(absmax)):
        _check_finite(weight, name)
    scale = _scale_from_absmax(absmax, fp8_max(dtype))
    rows = weight.reshape(-1, weight.shape[-1]) if weight.dim() > 2 else weight  # chunks of rows, not of dim 0
    qweight, _ = _quantize_chunks(rows, scale, dtype, None, errors)
    return qweight.reshape(weight.shape), scale


def fp8_as_half(qweight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(h, factor) with h float16 and h * factor == qweight exactly, for every finite FP8 value.

    torch's CPU conversion out of float8 is scalar; integer ops and float16 -> float32 are vectorised, so on
    the CPU this route is ~2x faster (bench: FP8 weight-only step). e5m2 is the top byte of a float16;
    e4m3fn's exponent and mantissa bits shifted into a float16 give the value / 256 (normal and subnormal
    alike). e4m3fn's NaN code reads as 480: the quantizer never writes it.
    """
    if qweight.dtype == torch.float8_e5m2:
        bits = qweight.view(torch.uint8).to(torch.int16).bitwise_left_shift_(8)
        return bits.view(torch.float16), 1.0
    if qweight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{qweight.dtype} is not an FP8 dtype")
    bits = qweight.view(torch.int8).to(torch.int16)  # sign-extended: the sign lands on bits 14 and 15
    bits.bitwise_left_shift_(7).bitwise_and_(~0x4000)  # keep it on bit 15 only
    return bits.view(torch.float16), 256.0


def _widenable(qweight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(t, factor) with t * factor == qweight, t cheap to widen: `fp8_as_half` for FP8 on the CPU, else as is."""
    if qweight.device.type == "cpu" and is_fp8(qweight):
        return fp8_as_half(qweight)
    return qweight, 1.0


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 weight * scale in `dtype` (the scale broadcasts: [out, 1] or []), scaled in place: one allocation, two
    passes (cast, scale). Off the CPU the float32 scale multiplies as it is (no per-call cast of the scale, and the
    product is rounded once); the CPU takes it in `dtype` (its kernels would widen a mixed-dtype operand first)."""
    narrow, factor = _widenable(qweight) if dtype.is_floating_point else (qweight, 1.0)
    out = narrow.to(dtype)
    if factor != 1.0:  # folded into the scale: one pass fewer
        scale = scale.to(device=qweight.device, dtype=torch.float32) * factor
    scale = scale.to(device=qweight.device, dtype=dtype if qweight.device.type == "cpu" else scale.dtype)
    if torch.broadcast_shapes(out.shape, scale.shape) != out.shape:
        return out * scale.to(dtype)
    return out.mul_(scale)


def quantize_unit_scale(tensor: torch.Tensor, fmt: str = "float8_e4m3fn",
                        name: str = "tensor") -> tuple[torch.Tensor | None, float | None, str]:
    """A non-Linear table (SD3's sin-cos `pos_embed`) in FP8 with an implied scale of 1.0.

    Stock ComfyUI reads an FP8 buffer by casting it, with no scale key, so 1.0 is the only scale that loads
    everywhere. Returns (FP8 tensor, its relative error, "") when that is as good as an absmax scale (within
    10%; on the sin-cos table it is better: 0.0183 vs 0.0201 in e4m3, as 1.0 keeps 0, +-0.5 and +-1 exact),
    else (None, error or None, why it stays 16-bit). NaN/Inf are refused, naming `name`.

    One chunked pass casts the table and sums its error (Medium's is 226M values). The absmax scale it is
    compared with is tried on evenly spaced rows only (at most ~`_COMPARED_ROWS`): it is never stored.
    """
    dtype = fp8_dtype(fmt)
    if tensor.numel() == 0:
        return torch.empty(tensor.shape, dtype=dtype, device=tensor.device), 0.0, ""
    absmax = float(_absmax(tensor))
    if not math.isfinite(absmax):
        _check_finite(tensor, name)
    if absmax > fp8_max(dtype):
        return None, None, f"{name}: values up to {absmax:.4g} exceed {fmt}'s range; kept 16-bit"
    rows = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 1 else tensor.reshape(-1, 1)
    unit, scaled = _ErrorSums(), _ErrorSums()
    one = torch.ones((), device=tensor.device)
    fp8, _ = _quantize_chunks(rows, one, dtype, None, unit)  # x / 1.0 -> FP8: the bits of tensor.to(dtype)
    sample = rows[:: max(1, rows.shape[0] // _COMPARED_ROWS)]
    absmax_t = torch.tensor(absmax, device=tensor.device)
    _quantize_chunks(sample, _scale_from_absmax(absmax_t, fp8_max(dtype)), dtype, None, scaled)
    error, scaled_error = unit.relative, scaled.relative
    if error > 1.1 * scaled_error:
        return None, error, (f"{name}: FP8 with scale 1.0 would err {error:.4f} ({scaled_error:.4f} with a scale, "
                             "which stock ComfyUI cannot read for a non-Linear tensor); kept 16-bit")
    return fp8.reshape(tensor.shape), error, ""


@torch.no_grad()
def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference|| / ||reference|| in float64 (0.0 for an all-zero reference), chunk by chunk."""
    reference, approx = reference.reshape(-1), approx.expand_as(reference).reshape(-1)
    step = _CPU_CHUNK_ELEMENTS if reference.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS  # cache-sized chunks
    num = den = 0.0
    for ref, app in zip(reference.split(step), approx.split(step)):
        ref = ref.double()
        den += float(ref.square().sum())
        num += float((app.double() - ref).square_().sum())
    return (num / den) ** 0.5 if den > 0 else num**0.5

