"""Inspection helpers for MODEL objects produced by the nodes (what the GPU would receive)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _unload_all() -> None:
    import comfy.model_management  # only importable once the host is booted

    # in inference mode, as ComfyUI runs every node: ComfyUI 0.8.0's mixed-precision layers re-wrap their
    # QuantizedTensor weights when moved, and outside it they come back unusable in inference mode
    with torch.inference_mode():
        comfy.model_management.unload_all_models()


def effective_linears(model) -> dict[str, torch.nn.Module]:
    """Each Linear of the diffusion model as it is when the patcher is loaded (object patches applied)."""
    _unload_all()  # clones share one module tree: restore the originals first
    dm = model.model.diffusion_model
    out = {}
    for name, module in dm.named_modules():
        module = model.object_patches.get(f"diffusion_model.{name}", module)
        if isinstance(module, torch.nn.Linear):
            out[name] = module
    return out


def fp8_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in effective_linears(model).items() if m.weight.dtype in FP8}


def clip_weights(clip) -> dict[str, torch.Tensor]:
    """{module name: weight} of a CLIP's text encoders as its patcher runs them (object patches applied)."""
    _unload_all()
    modules = ((n, clip.patcher.object_patches.get(n, m)) for n, m in clip.cond_stage_model.named_modules())
    return {n: m.weight for n, m in modules if isinstance(getattr(m, "weight", None), torch.Tensor)}


def snapshot(model) -> dict[str, torch.Tensor]:
    """A bit-exact copy of the diffusion model's own tensors (to prove nothing changed them)."""
    _unload_all()
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def host_quantized_layers(model) -> set[str]:
    """Layers the host's own mixed-precision ops hold as its QuantizedTensor (both hosts have comfy.quant_ops;
    ComfyUI 0.3.75 listed them in model_config.layer_quant_config, 0.8.0 has no such list)."""
    from comfy.quant_ops import QuantizedTensor

    _unload_all()
    return {name for name, module in model.model.diffusion_model.named_modules()
            if isinstance(getattr(module, "weight", None), QuantizedTensor)}


def write_legacy_scaled_fp8(source: Path, path: Path, prefix: str = "", layers: str = r"joint_blocks\.") \
        -> dict[str, torch.Tensor]:
    """An older-ComfyUI scaled_fp8 file from a 16-bit one: marker tensor, per-tensor float32 `scale_weight` on
    the Linear weights whose name after `prefix` starts with the regex `layers` (the joint blocks' for SD3.5, as
    ComfyUI distributes them; the rest stays 16-bit). Returns its tensors."""
    sd = load_file(str(source))
    legacy = {f"{prefix}scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, tensor in sd.items():
        if re.match(re.escape(prefix) + layers, key) and key.endswith(".weight") and tensor.dim() == 2:
            scale = tensor.float().abs().max() / 448
            legacy[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            legacy[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            legacy[key] = tensor
    save_file(legacy, str(path))
    return legacy


def combo_options(definition) -> list:
    """A combo input's choices from a node definition (INPUT_TYPES or /object_info): ComfyUI 0.3.75 lists them
    first; 0.8.0's V3 nodes say "COMBO" and list them under "options"."""
    return list(definition[0]) if isinstance(definition[0], list | tuple) else list(definition[1]["options"])
