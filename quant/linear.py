"""The FP8 linear layer: FP8 weight + float32 scale, two compute paths.

- weight_only: dequantize the weight to the activation dtype, then an ordinary matmul.
  Works everywhere (CPU, Ampere, ROCm; MPS gets the weight dequantized before transfer).
- fp8_matmul: FP8 x FP8 on tensor cores with `torch._scaled_mm`, as CUDA runs it best: each
  activation row (token) gets its own scale (row-wise: one outlier token does not flatten the
  others), the weight keeps its per-output-channel scales as the other row-wise operand, and the
  product comes out directly in the activation dtype. Where `_scaled_mm`'s constraints do not
  hold (see `scaled_mm_problem`), the layer falls back to weight_only and says so once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .formats import dequantize_weight, is_fp8, quantize_weight
from .hardware import resolve_compute

_E4M3 = torch.float8_e4m3fn
_E4M3_MAX = float(torch.finfo(_E4M3).max)
# Test-only: let the fp8_matmul path run on the CPU (torch's CPU _scaled_mm takes row-wise float8 scales), so
# its numerics are checked in CI; devices without FP8 matmul never take the path otherwise.
RUN_SCALED_MM_ON_CPU = False
_noted: set[str] = set()


def scaled_mm_problem(x2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> str | None:
    """Why `torch._scaled_mm` cannot take these operands (None if it can): a CUDA device, an e4m3 weight
    (e5m2 x e4m3 is not a supported pair everywhere), both matrix dims multiples of 16, a row-major weight
    (its transpose is then the column-major mat2 the kernel wants), a 16-bit activation and a float32 scale."""
    if not (x2d.is_cuda or (RUN_SCALED_MM_ON_CPU and x2d.device.type == "cpu")):
        return f"{x2d.device.type} has no FP8 matmul"
    if weight.dtype != _E4M3:
        return f"{weight.dtype} weights are multiplied as weight_only (FP8 matmul pairs e4m3 with e4m3)"
    if x2d.shape[1] % 16 or weight.shape[0] % 16:
        return f"dims {x2d.shape[1]}x{weight.shape[0]} are not multiples of 16"
    if not weight.is_contiguous():
        return "the weight is not row-major"
    if x2d.dtype not in (torch.float16, torch.bfloat16, torch.float32) or scale.dtype != torch.float32:
        return f"activation {x2d.dtype} / scale {scale.dtype} not supported"
    return None


def fp8_matmul_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias, FP8 x FP8 with row-wise scales; weight_only where it cannot run."""
    x2d = x.reshape(-1, x.shape[-1])
    problem = scaled_mm_problem(x2d, weight, scale)
    if problem is not None:
        if problem not in _noted:
            _noted.add(problem)
            logging.getLogger(__name__).info("fp8_matmul: falling back to weight_only where %s", problem)
        return scaled_linear(x, weight, scale, bias)  # weight_only
    # per-token scales: the reduction is float32, the scaled copy stays in the activation's dtype
    inv = x2d.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12).reciprocal_().mul_(_E4M3_MAX)
    x_scale = inv.reciprocal()
    if x2d.dtype != torch.float32:
        inv = inv.clamp_(max=torch.finfo(x2d.dtype).max).to(x2d.dtype)
    xq = (x2d * inv).clamp_(-_E4M3_MAX, _E4M3_MAX).to(_E4M3)
    w_scale = scale.reshape(1, -1).expand(1, weight.shape[0]).contiguous()
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], -1)


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  compute: str = "weight_only") -> torch.Tensor:
    """The functional form both FP8Linear and ComfyUI's FP8 ops call. `compute` is already resolved."""
    if compute == "fp8_matmul":
        return fp8_matmul_linear(x, weight, scale, bias)
    return F.linear(x, dequantize_weight(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype))


class FP8LinearMixin:
    """The FP8 layer: `weight` float8 [out, in], `weight_scale` float32 ([out, 1] or []), optional `bias`, and the
    one rule for `compute` (auto | weight_only | fp8_matmul, resolved once per device). FP8Linear below is it as a
    plain torch module; the pack's ComfyUI ops class (nodes/fp8_ops.py) mixes it into ComfyUI's Linear and adds
    ComfyUI's patching protocol."""

    weight: torch.Tensor
    weight_scale: torch.Tensor | None
    bias: torch.Tensor | None
    compute: str

    def compute_for(self, device: torch.device) -> str:
        resolved = self.__dict__.setdefault("_resolved_compute", {})
        if str(device) not in resolved:
            resolved[str(device)] = resolve_compute(self.compute, device)
        return resolved[str(device)]

    def fp8_forward(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
        """y = x @ (weight * scale).T + bias, on the path `compute` resolves to on x's device."""
        return scaled_linear(x, weight, scale, bias, self.compute_for(x.device))

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

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, fp8_format: str = "float8_e4m3fn", scaling: str = "per_channel",
                    compute: str = "auto", name: str = "weight") -> FP8Linear:
        qweight, scale = quantize_weight(linear.weight.detach(), fp8_format, scaling, name=name)
        return cls(qweight, scale, linear.bias, compute)  # __init__ keeps a detached copy of the bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fp8_forward(x, self.weight, self.weight_scale, self.bias)
