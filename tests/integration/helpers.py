"""Inspection helpers for MODEL objects produced by the nodes (what the GPU would receive)."""

from __future__ import annotations

import torch

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _unload_all() -> None:
    import comfy.model_management  # only importable once the host is booted

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


def snapshot(model) -> dict[str, torch.Tensor]:
    """A bit-exact copy of the diffusion model's own tensors (to prove nothing changed them)."""
    _unload_all()
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
