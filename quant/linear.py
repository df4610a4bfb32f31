"""The FP8 linear layer: FP8 weight + float32 scale, two compute paths.

- weight_only: the weight cast to the activation dtype and scaled in place (two passes over the weight), then one
  matmul with the bias inside it. Works everywhere (CPU, Ampere, ROCm; MPS gets the weight dequantized before
  transfer).
- fp8_matmul: FP8 x FP8 on tensor cores with `torch._scaled_mm`, as CUDA runs it best: each activation row (token)
  gets its own scale (row-wise: one outlier token does not flatten the others), the weight keeps its per-output-channel
  scales as the other row-wise operand (the stored [out, 1] float32 scale *is* that operand, as a [1, out] view: no
  work per call), and the product comes out directly in the activation dtype with the bias added inside the same
  kernel. The activation's quantization is three small ops (absmax per row, its scale, one scaled cast into FP8), all
  elementwise or reductions torch.compile can fuse. Where `_scaled_mm`'s constraints do not hold (see
  `scaled_mm_problem`), the layer falls back to weight_only and says so once.

compute=auto takes fp8_matmul only where the device has it and a one-time timing of both paths at the layer's shape
on that device finds it faster (`auto_compute`): a GPU where fp8_matmul loses never gets it by default.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F

from .formats import dequantize_weight, is_fp8
from .hardware import probe_device, resolve_compute, rowwise_problem

_E4M3 = torch.float8_e4m3fn
_E4M3_MAX = float(torch.finfo(_E4M3).max)
_TINY = torch.finfo(torch.float32).tiny
_noted: set[str] = set()

AUTO_TOKENS = 4096  # activation rows of the auto timing: one 1024x1024 SD3.5 image has 4096 image tokens
AUTO_MARGIN = 0.9  # auto takes fp8_matmul only when it needs at most 90% of weight_only's time
AUTO_ROUNDS = 5
_auto_choice: dict[tuple[str, torch.dtype, int, int], str] = {}


def runs_scaled_mm(device: torch.device) -> bool:
    """Whether fp8_matmul multiplies on this device with `torch._scaled_mm` (CUDA). Tests replace this function to
    run the path's arithmetic on the CPU, whose `_scaled_mm` takes row-wise scales from torch 2.14."""
    return device.type == "cuda"


def scaled_mm_problem(x2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> str | None:
    """Why `torch._scaled_mm` cannot take these operands (None if it can): a device that runs it, row-wise scales and
    this output dtype on it (`hardware.rowwise_problem`), an e4m3 weight (e5m2 x e4m3 is not a supported pair
    everywhere), both matrix dims multiples of 16, a row-major weight (its transpose is then the column-major mat2 the
    kernel wants) and a float32 scale."""
    if not runs_scaled_mm(x2d.device):
        return f"{x2d.device.type} has no FP8 matmul"
    if weight.dtype != _E4M3:
        return f"{weight.dtype} weights are multiplied as weight_only (FP8 matmul pairs e4m3 with e4m3)"
    if x2d.shape[1] % 16 or weight.shape[0] % 16:
        return f"dims {x2d.shape[1]}x{weight.shape[0]} are not multiples of 16"
    if not weight.is_contiguous():
        return "the weight is not row-major"
    if x2d.dtype not in (torch.float16, torch.bfloat16, torch.float32) or scale.dtype != torch.float32:
        return f"activation {x2d.dtype} / scale {scale.dtype} not supported"
    return rowwise_problem(x2d.device, x2d.dtype)


def quantize_rows(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 copy of x2d, float32 scales [rows, 1]) with x2d ~= copy * scales, one scale per row (token).

    Three ops: the per-row absmax reduced in float32 (exact: the max of 16-bit values), absmax / 448 (never below
    float32's smallest normal, so an all-zero row divides to zeros), and one division written straight into the FP8
    tensor (computed in float32, rounded once). |x / scale| <= 448 up to one float32 rounding, which rounds to 448:
    no clamp is needed."""
    scale = torch.linalg.vector_norm(x2d, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    scale = scale.div_(_E4M3_MAX).clamp_(min=_TINY)
    return torch.div(x2d, scale, out=torch.empty(x2d.shape, dtype=_E4M3, device=x2d.device)), scale


def weight_scale_row(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """The weight scale as `_scaled_mm`'s row-wise scale_b, [1, out] float32 contiguous: a view of a per-channel
    [out, 1] scale (no copy, so it follows any change to the scale), a small copy of a per-tensor one."""
    row = scale.reshape(1, -1)
    return row if row.shape[1] == out_features else row.expand(1, out_features).contiguous()


def fp8_matmul_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias, FP8 x FP8 with row-wise scales; weight_only where it cannot run."""
    x2d = x.reshape(-1, x.shape[-1])
    problem = scaled_mm_problem(x2d, weight, scale)
    if problem is not None:
        if problem not in _noted:
            _noted.add(problem)
            logging.getLogger(__name__).info("fp8_matmul: falling back to weight_only where %s", problem)
        return weight_only_linear(x, weight, scale, bias)
    xq, x_scale = quantize_rows(x2d)
    fused_bias = bias is not None and x.dtype != torch.float32  # _scaled_mm adds a 16-bit bias, not a float32 one
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale_row(scale, weight.shape[0]),
                           bias=bias.to(x.dtype) if fused_bias else None, out_dtype=x.dtype)
    if bias is not None and not fused_bias:
        out += bias
    return out.reshape(*x.shape[:-1], -1)


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias in x's dtype: the weight dequantized (cast, then scaled in place with the
    float32 scale), then one matmul that adds the bias."""
    return F.linear(x, dequantize_weight(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype))


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  compute: str = "weight_only") -> torch.Tensor:
    """The functional form both FP8Linear and ComfyUI's FP8 ops call. `compute` is already resolved."""
    if compute == "fp8_matmul":
        return fp8_matmul_linear(x, weight, scale, bias)
    return weight_only_linear(x, weight, scale, bias)


def time_paths(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> dict[str, float]:
    """Median seconds of one forward of each path at this shape on `device` (AUTO_TOKENS rows, random operands)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(AUTO_TOKENS, in_features, device=device, generator=gen).to(dtype)
    weight = torch.randn(out_features, in_features, device=device, generator=gen).to(_E4M3)
    scale = torch.full((out_features, 1), 1e-3, device=device)
    bias = torch.zeros(out_features, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"weight_only": [], "fp8_matmul": []}
    for round_ in range(AUTO_ROUNDS + 1):  # round 0 warms up
        for path in times:
            sync()
            start = time.perf_counter()
            scaled_linear(x, weight, scale, bias, path)
            sync()
            if round_:
                times[path].append(time.perf_counter() - start)
    return {path: statistics.median(ts) for path, ts in times.items()}


def auto_compute(device: torch.device | str, dtype: torch.dtype, out_features: int, in_features: int) -> str:
    """What compute=auto runs for a layer of this shape and activation dtype on `device`: weight_only where the
    device cannot run fp8_matmul (`hardware.resolve_compute`) or the operands cannot take it, else the faster path
    as timed once per (device, dtype, shape) in this process; fp8_matmul must need <= AUTO_MARGIN of weight_only's
    time, so a device where it loses or ties keeps weight_only."""
    device = torch.device(device)
    if resolve_compute("auto", device) != "fp8_matmul" or rowwise_problem(device, dtype) is not None:
        return "weight_only"
    key = (str(device), dtype, out_features, in_features)
    if key not in _auto_choice:
        try:
            seconds = time_paths(device, dtype, out_features, in_features)
        except RuntimeError as err:  # a path this torch/device pair cannot run is never the default
            logging.getLogger(__name__).warning("compute=auto: fp8_matmul failed on %s (%s); weight_only", device, err)
            seconds = {"weight_only": 1.0, "fp8_matmul": float("inf")}
        fast = seconds["fp8_matmul"] <= AUTO_MARGIN * seconds["weight_only"]
        _auto_choice[key] = "fp8_matmul" if fast else "weight_only"
        logging.getLogger(__name__).info("compute=auto on %s (%s): %s for %dx%d (fp8_matmul %.3f ms, weight_only %.3f "
                                         "ms)", probe_device(device).name, dtype, _auto_choice[key], out_features,
                                         in_features, 1e3 * seconds["fp8_matmul"], 1e3 * seconds["weight_only"])
    return _auto_choice[key]


class FP8LinearMixin:
    """The FP8 layer: `weight` float8 [out, in], `weight_scale` float32 ([out, 1] or []), optional `bias`, and the
    one rule for `compute` (auto | weight_only | fp8_matmul, resolved once per device and activation dtype).
    FP8Linear below is it as a plain torch module; the pack's ComfyUI ops class (nodes/fp8_ops.py) mixes it into
    ComfyUI's Linear and adds ComfyUI's patching protocol."""

    weight: torch.Tensor
    weight_scale: torch.Tensor | None
    bias: torch.Tensor | None
    compute: str

    def compute_for(self, device: torch.device, dtype: torch.dtype = torch.float16) -> str:
        resolved = self.__dict__.setdefault("_resolved_compute", {})
        key = (str(device), dtype)
        if key not in resolved:
            resolved[key] = auto_compute(device, dtype, *self.weight.shape) if self.compute == "auto" else \
                resolve_compute(self.compute, device)
        return resolved[key]

    def fp8_forward(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
        """y = x @ (weight * scale).T + bias, on the path `compute` resolves to on x's device."""
        return scaled_linear(x, weight, scale, bias, self.compute_for(x.device, x.dtype))

    def extra_repr(self) -> str:
        out, in_ = self.weight.shape
        kind = f"{self.weight.dtype}, scale {tuple(self.weight_scale.shape)}" if self.weight_scale is not None \
            else f"{self.weight.dtype} (16-bit layer)"
        return f"in_features={in_}, out_features={out}, {kind}, compute={self.compute}"


class FP8Linear(FP8LinearMixin, torch.nn.Module):
    """The FP8 layer for plain torch modules (`quant.quantize`)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 compute: str = "auto") -> None:
        super().__init__()
        if not is_fp8(weight) or weight.dim() != 2:
            raise ValueError(f"FP8Linear needs a 2-D float8 weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(weight_scale.float(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute = compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fp8_forward(x, self.weight, self.weight_scale, self.bias)
