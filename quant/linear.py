"""The FP8 linear layer: FP8 weight + float32 scale, two compute paths.

- weight_only: dequantize the weight to the activation dtype, then an ordinary matmul.
  Works everywhere (CPU, Ampere, ROCm; MPS gets the weight dequantized before transfer).
- fp8_matmul: scale the activation dynamically to float8_e4m3fn (one absmax scale per
  call) and multiply on FP8 tensor cores with `torch._scaled_mm`. The weight's per-output-
  channel scale factors out of the product, so it is applied to the output columns: the same
  result as dequantize-then-matmul up to the activation's own rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import dequantize_weight, format_name, is_fp8, quantize_weight, quantize_with_scale
from .hardware import resolve_compute

_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def _scaled_mm_ok(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """_scaled_mm needs CUDA tensors and both matrix dims divisible by 16."""
    return x2d.is_cuda and x2d.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0


def fp8_matmul_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias on FP8 tensor cores."""
    x2d = x.reshape(-1, x.shape[-1])
    if not _scaled_mm_ok(x2d, weight):
        return weight_only_linear(x, weight, scale, bias)
    x_scale = (x2d.abs().amax().float() / _E4M3_MAX).clamp_(min=1e-12)
    xq = (x2d.float() / x_scale).clamp_(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=one, out_dtype=torch.float32)
    out = out * scale.reshape(1, -1) if scale.numel() > 1 else out * scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], -1)


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    w = dequantize_weight(weight, scale, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               compute: str = "weight_only") -> torch.Tensor:
    """The functional form both FP8Linear and ComfyUI's FP8 ops call. `compute` is already resolved."""
    if compute == "fp8_matmul":
        return fp8_matmul_linear(x, weight, scale, bias)
    return weight_only_linear(x, weight, scale, bias)


def store_weight(module: torch.nn.Module, new: torch.Tensor, inplace_update: bool) -> None:
    """ModelPatcher's set_weight contract: copy into the existing tensor, or replace the parameter."""
    if inplace_update:
        module.weight.data.copy_(new)
    else:
        module.weight = torch.nn.Parameter(new, requires_grad=False)


class FP8Linear(torch.nn.Module):
    """A Linear whose `weight` is FP8 and `weight_scale` float32 ([out, 1] or []).

    `convert_weight`/`set_weight` follow the protocol ComfyUI's ModelPatcher uses for scaled
    weights (LoRA): patches are computed on the dequantized weight and written back quantized
    with the layer's existing scale, which a patcher's backup never restores.
    """

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
        self._resolved: dict[str, str] = {}

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, fp8_format: str = "float8_e4m3fn", scaling: str = "per_channel",
                    compute: str = "auto", name: str = "weight") -> FP8Linear:
        qweight, scale = quantize_weight(linear.weight.detach(), fp8_format, scaling, name=name)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(qweight, scale, bias, compute)

    @property
    def fp8_format(self) -> str:
        return format_name(self.weight.dtype)

    def _compute_for(self, device: torch.device) -> str:
        key = str(device)
        if key not in self._resolved:
            self._resolved[key] = resolve_compute(self.compute, device)
        return self._resolved[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self._compute_for(x.device))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        return dequantize_weight(weight, self.weight_scale.to(weight.device), torch.float32)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs) -> torch.Tensor | None:
        new = quantize_with_scale(weight, self.weight_scale.to(weight.device), self.fp8_format)
        if return_weight:
            return new
        store_weight(self, new, inplace_update)
        return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}, "
                f"scale {tuple(self.weight_scale.shape)}, compute={self.compute}")
