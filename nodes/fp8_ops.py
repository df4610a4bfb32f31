"""ComfyUI operations whose Linear holds an FP8 weight and a float32 weight_scale.

The seam is ComfyUI's own: an ops class passed as model_options["custom_operations"]
(loaders) or a Linear built from it and swapped in with an object patch on a cloned
ModelPatcher (the quantize node). Math lives in quant/; this file only adapts it to
ComfyUI's conventions:
- weights are created uninitialised (no pages touched) and replaced from the state dict,
  so loading never fills a 16-bit copy of a layer that arrives in FP8;
- weight patches (LoRA and the rest) are applied at run time by `forward` and never rounded into the FP8
  weight (nodes/runtime_patches.py: a LoRA as a low-rank branch beside the FP8 matmul, other patches on the
  dequantized weight; the same for a layer offloaded in low-VRAM mode, whose patches come as ComfyUI's
  LowVramPatch);
- where a merge is asked for (a load with force_patch_weights: save nodes; model merging), ModelPatcher merges
  through `convert_weight` / `set_weight`: the patched weight is re-quantized once with a fresh absmax scale
  (`quant.formats.requantize`; the old scale would clip what the patch adds). The new scale travels with the
  weight: it is an attribute of the new Parameter (`host_fp8.OWN_SCALE`), and `weight_scale` always belongs to
  the unpatched weight. ModelPatcher backs up and restores the weight alone (the original Parameter, or a new one
  around its copy), and a restored weight carries no scale of its own, so unpatching brings back the exact
  layer, scale included. In-place updates (`inplace_update`, restored by copying the bits back into the same
  Parameter) keep the scale the weight has; hook patches never come here (they run at run time too).
  `convert_weight` scales the bits it is given with their own scale: the patched weight's, or the unpatched
  one's for ModelPatcher's backup. Moves keep the travelling scale with the weight (`_apply`), and the state
  dict writes the scale of the weight beside it;
- whatever dtype ComfyUI picks for the model (`unet_dtype()` picks float8 for a mostly-FP8
  state dict on FP8 GPUs and small cards), a layer that arrives 16-bit stays 16-bit: a plain
  float8 cast of a protected layer or a bias is the damage the pack exists to avoid;
- a fresh class per load (`make_fp8_ops`), so one model's settings never leak to another.
"""

from __future__ import annotations

import comfy.model_management
import comfy.ops
import torch

from ..quant.formats import FP8_DTYPES, dequantize_weight, format_name, is_fp8, quantize_with_scale, requantize
from ..quant.hardware import resolve_compute
from ..quant.linear import FP8LinearMixin
from .host_fp8 import OWN_SCALE, scale_of
from .runtime_patches import low_vram_patches, runtime_patches_of

FLOAT8_DTYPES = frozenset(FP8_DTYPES.values())


class FP8OpsLinear(FP8LinearMixin, comfy.ops.manual_cast.Linear):
    """ComfyUI's Linear holding an FP8 weight + float32 weight_scale (or a 16-bit weight, kept 16-bit)."""

    compute: str = "auto"  # set per load by make_fp8_ops
    takes_runtime_patches = True  # FP8LayerPatcher hands this layer its weight patches (nodes/runtime_patches.py)
    runtime_patches: tuple[str, list] | None = None  # (weight key, ComfyUI's patch list) while a patcher applies them
    runtime_hook_patches: tuple[str, list] | None = None  # the same for the hook patches applied now

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        torch.nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.target_device = device
        self.target_dtype = dtype
        # uninitialised like ComfyUI's own ops: untouched pages cost no memory, and the state dict
        # replaces them (with an FP8 tensor where the file has one). Not meta: ComfyUI may move a
        # module (CLIP does) before its weights are loaded.
        empty = {"device": device, "dtype": dtype or torch.float32}
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), **empty), requires_grad=False)
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, **empty), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_parameter("weight_scale", None)

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale is not None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        weight = state_dict.pop(prefix + "weight", None)
        scale = state_dict.pop(prefix + "weight_scale", None)
        bias = state_dict.pop(prefix + "bias", None)
        state_dict.pop(prefix + "input_scale", None)  # we scale activations dynamically
        if weight is None:
            missing_keys.append(prefix + "weight")
            return
        device = self.target_device if self.target_device is not None else weight.device
        if is_fp8(weight):
            if scale is None:
                raise ValueError(f"{prefix}weight is {weight.dtype} but the file has no {prefix}weight_scale: "
                                 "it is not a scaled FP8 checkpoint this pack can read")
            self.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
            self.weight_scale = torch.nn.Parameter(scale.to(device, torch.float32), requires_grad=False)
        else:
            self.weight = torch.nn.Parameter(weight.to(device, self._wide_dtype(weight)), requires_grad=False)
        if self.bias is not None:
            if bias is None:
                missing_keys.append(prefix + "bias")
            else:
                self.bias = torch.nn.Parameter(bias.to(device, self._wide_dtype(bias)), requires_grad=False)

    def _wide_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        """The model's dtype, unless it is a float8 (never a plain cast): then the tensor's own."""
        dtype = self.target_dtype or tensor.dtype
        return tensor.dtype if dtype in FLOAT8_DTYPES else dtype

    def current_scale(self) -> torch.Tensor:
        """The scale of the weight the layer holds now (see the module docstring)."""
        return scale_of(self.weight, self.weight_scale)

    def forward(self, x, *args, **kwargs):
        if not self.is_fp8:
            return super().forward(x, *args, **kwargs)
        comfy.ops.run_every_op()
        weight = self.weight.to(x.device, non_blocking=True)
        scale = self.current_scale().to(x.device, non_blocking=True)
        bias = None
        if self.bias is not None:
            bias = self.bias.to(x.device, x.dtype, non_blocking=True)
            for patch in self.bias_function:
                bias = patch(bias)
        low_vram, functions = low_vram_patches(self.weight_function)
        # a low-VRAM load hands the same patches as a LowVramPatch; hook patches come on their own
        patches = runtime_patches_of(self, low_vram or self.runtime_patches)
        if functions or (patches is not None and patches.on_weight):  # on the real weight, one layer at a time
            real = dequantize_weight(weight, scale, torch.float32)
            if patches is not None:
                real = patches.patch_weight(real)
            for function in functions:
                real = function(real)
            out = torch.nn.functional.linear(x, real.to(x.dtype), bias)
        else:
            out = self.fp8_forward(x, weight, scale, bias)
        if patches is not None and patches.branch is not None:
            out = patches.branch.add_to(out, x)
        return out

    def convert_weight(self, weight, inplace=False, **kwargs):
        if not self.is_fp8:
            return weight
        scale = self.current_scale()
        if scale is not self.weight_scale and not torch.equal(weight, self.weight.to(weight.device, weight.dtype)):
            scale = self.weight_scale  # not the merged weight's bits: ModelPatcher's backup (e.g. a merge's source)
        scale = scale.to(weight.device)
        if inplace and weight.dtype == torch.float32:
            return weight.mul_(scale)  # float32: a small scale would underflow in float16
        return dequantize_weight(weight, scale, torch.float32)

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        if not self.is_fp8:
            new = weight.to(self.weight.dtype)
        elif inplace_update:  # the copy-in restore brings back bits only: keep the scale those bits have
            new = quantize_with_scale(weight, self.current_scale().to(weight.device), format_name(self.weight.dtype))
        else:
            new = requantized_weight(weight, self.current_scale().to(weight.device), self.weight.dtype)
        if return_weight:
            return new
        if inplace_update:  # ModelPatcher's set_weight contract: copy in, or replace the parameter
            self.weight.data.copy_(new)
        else:
            self.weight = new if isinstance(new, torch.nn.Parameter) else torch.nn.Parameter(new, requires_grad=False)

    def _apply(self, fn, recurse=True):
        """Moves and casts take a re-quantized weight's own scale along (torch may also replace the Parameter)."""
        own = getattr(self.weight, OWN_SCALE, None)
        out = super()._apply(fn, recurse)
        if own is not None:
            setattr(self.weight, OWN_SCALE, fn(own))
        return out

    def saved_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 weight and scale a state dict writes for this layer: the weight the layer holds now, with its
        own scale (a merged LoRA's, while one is applied)."""
        return self.weight, self.current_scale()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        from .stock_layout import write_for_file  # a module of its own: the save-time layout per host

        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_fp8:
            weight, scale = self.saved_weight()
            destination[prefix + "weight"] = weight if keep_vars else weight.detach()
            destination[prefix + "weight_scale"] = scale if keep_vars else scale.detach()
            write_for_file(self, destination, prefix)  # a save node writing a file: the layout the host reads


class FP8Ops(comfy.ops.manual_cast):
    """The pack's ops class: ComfyUI's manual_cast ops with the FP8 Linear."""

    Linear = FP8OpsLinear


def make_fp8_ops(compute: str = "auto") -> type:
    """An ops class for one model: its Linear becomes FP8 when its state dict carries FP8 weights. A fresh
    subclass per load carries that load's settings, so they never leak into another model's layers."""
    linear = type("FP8OpsLinear", (FP8OpsLinear,), {"compute": compute})
    return type("FP8Ops", (FP8Ops,), {"Linear": linear})


def requantized_weight(weight: torch.Tensor, old_scale: torch.Tensor, dtype: torch.dtype) -> torch.nn.Parameter:
    """A patched (real-valued) weight in FP8 with a fresh scale, as the Parameter that carries that scale."""
    qweight, scale = requantize(weight, old_scale, format_name(dtype))
    new = torch.nn.Parameter(qweight, requires_grad=False)
    setattr(new, OWN_SCALE, scale)
    return new


def ops_linear_holding(ops: type, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    bias_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A Linear of `ops` holding the given FP8 weight and scale (for object patches)."""
    out_features, in_features = qweight.shape
    layer = ops.Linear(in_features, out_features, bias=bias is not None, device=qweight.device,
                       dtype=bias_dtype or (bias.dtype if bias is not None else None))
    sd = {"weight": qweight, "weight_scale": scale}
    if bias is not None:
        sd["bias"] = bias
    layer.load_state_dict(sd)
    return layer


def check_compute_supported(compute: str) -> str:
    """Fail at load time, naming the input, when `compute` cannot run on ComfyUI's device."""
    return resolve_compute(compute, comfy.model_management.get_torch_device())
