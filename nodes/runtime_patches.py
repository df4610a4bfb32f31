"""Weight patches (LoRA and the rest) on the pack's FP8 layers, applied at run time and never rounded into FP8.

ComfyUI merges a weight patch into the weight when it loads a model (`ModelPatcher.patch_weight_to_device`): for an
FP8 weight that rounds W + dW into FP8 a second time. The pack's models run on a ModelPatcher that leaves an FP8
layer's weight as it is and hands the layer its patches instead (`FP8LayerPatcher`); the layer applies them in
its forward (nodes/fp8_ops.py):
- a plain LoRA (LoCon on a Linear is the same) as a low-rank branch beside the FP8 matmul,
  y = fp8_linear(x) + strength * alpha / rank * (x down^T) up^T, so the fast FP8 path stays in use
  (`LowRankBranch`: two thin matmuls per LoRA on the LoRA's own tensors, no copy held; sliced patches such as
  diffusers' to_q on the fused qkv add into their rows);
- anything else (LoHa, LoKr, diff, set, DoRA, a patch function) on the dequantized weight, one layer at a time,
  with ComfyUI's own `calculate_weight`, as its low-VRAM path does.
Low-VRAM loads (ComfyUI's `LowVramPatch`) go through the same two routes. Unpatching only drops the patches: the
FP8 weight was never touched.

A merge happens only where one is asked for, and rounds the patched weight once: a load that forces patches into
the weights (`force_patch_weights`: ComfyUI's save nodes, Save FP8 Model), and a patch that scales the model's own
weight (`strength_model` != 1: the model-merge nodes, which blend two models' weights). After a save, the next
ordinary load goes back to run-time patches.

Hook patches (Create Hook LoRA, scheduled per conditioning and step) take the same two routes: ComfyUI's
`patch_hooks` hands an FP8 layer the hooks' combined patches (`runtime_hook_patches`, applied after the model's own)
and `unpatch_hooks` takes them back; the FP8 weight is never written. The pack's patchers run hooks in ComfyUI's
MinVram mode, which caches no patched weights: the default mode's cache would, from the second step on, unpatch every
key it has not cached, the FP8 layers' included.

The class is swapped on the pack's own ModelPatchers (`use_fp8_patcher`); `clone()` keeps it, so stock LoRA loaders
and other packs' patch nodes get it too.
"""

from __future__ import annotations

import contextlib

import comfy.hooks
import comfy.lora
import comfy.model_patcher
import comfy.utils
import torch

try:  # both tested hosts have it; the branch is an optimisation, calculate_weight the fallback
    from comfy.weight_adapter.lora import LoRAAdapter
except ImportError:  # pragma: no cover
    LoRAAdapter = None


class LowRankBranch:
    """Every plain LoRA of one layer, added to the layer's output: out[..., rows] += s * (x[..., cols] @ down^T) @ up^T
    with s = strength * alpha / rank. It holds the LoRA's own tensors, no copy: on the device they live on, each
    forward casts one layer's factors to the compute dtype into a shared scratch buffer; on another device (a GPU,
    with the patches on the CPU) they are moved there once, at the compute dtype, and kept while the patch holds."""

    def __init__(self, patches: list) -> None:
        self.parts = []
        for strength, adapter, _, offset, _ in patches:
            up, down, alpha = adapter.weights[0], adapter.weights[1], adapter.weights[2]
            rank = down.shape[0]
            scale = strength * (float(alpha) / rank if alpha is not None else 1.0)
            rows, cols = slice(None), slice(None)
            if offset is not None:
                dim, start, length = offset
                if dim == 0:
                    rows = slice(start, start + length)
                else:
                    cols = slice(start, start + length)
            self.parts.append((down, up, scale, rows, cols))  # 2-D: is_plain_lora checked
        self._moved: dict[tuple, list] = {}

    def _factors(self, x: torch.Tensor) -> list:
        if all(down.device == x.device for down, *_ in self.parts):
            return self.parts  # cast per use into a scratch buffer (_in_dtype)
        key = (x.device, x.dtype)
        if key not in self._moved:
            self._moved[key] = [(down.to(x.device, x.dtype), up.to(x.device, x.dtype), *rest)
                                for down, up, *rest in self.parts]
        return self._moved[key]

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out` (the layer's output for `x`, a fresh tensor) with the LoRAs' update added in place: the second
        product accumulates straight into `out` (addmm), no [tokens, out_features] temporary."""
        out = out.contiguous()
        out2d, x2d = out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
        for down, up, scale, rows, cols in self._factors(x):
            hidden = torch.mm(x2d[:, cols], _in_dtype(down, x.dtype, 0).t())
            out2d[:, rows].addmm_(hidden, _in_dtype(up, x.dtype, 1).t(), alpha=scale)
        return out


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _in_dtype(factor: torch.Tensor, dtype: torch.dtype, slot: int) -> torch.Tensor:
    """`factor` in `dtype`, cast into a scratch buffer reused by every layer (per device, dtype and slot): casting
    into fresh tensors each forward left the allocator holding twice the LoRA's size on the CPU (measured, bench
    section 11). Valid until the next cast into the same slot."""
    if factor.dtype == dtype:
        return factor
    key = (factor.device, dtype, slot)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < factor.numel():
        buffer = _SCRATCH[key] = torch.empty(factor.numel(), dtype=dtype, device=factor.device)
    return buffer[: factor.numel()].view(factor.shape).copy_(factor)


def is_plain_lora(patch: tuple, out_features: int, in_features: int) -> bool:
    """A patch the low-rank branch applies exactly: a LoRA on the model's weight as it is (strength_model 1, no
    patch function), without DoRA, LoCon mid weights or a reshape, whose factors fit the layer (or its slice)."""
    _, adapter, strength_model, offset, function = patch
    if LoRAAdapter is None or not isinstance(adapter, LoRAAdapter) or strength_model != 1.0 or function is not None:
        return False
    up, down, _, mid, dora_scale, reshape = adapter.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return False
    out_f, in_f = out_features, in_features
    if offset is not None:
        dim, _, length = offset
        if dim == 0:
            out_f = length
        else:
            in_f = length
    return up.dim() == 2 and down.dim() == 2 and up.shape == (out_f, down.shape[0]) and down.shape[1] == in_f


class RuntimeWeightPatches:
    """The patches of one FP8 layer's weight (the model's own, then its hook patches) and how they are applied: all
    as a low-rank branch where every one is a plain LoRA, else all on the dequantized weight."""

    def __init__(self, key: str, sources: tuple[list | None, list | None], out_features: int,
                 in_features: int) -> None:
        self.key = key
        self.sources = sources
        patches = [patch for source in sources if source for patch in source]
        plain = all(is_plain_lora(p, out_features, in_features) for p in patches)
        self.branch = LowRankBranch(patches) if plain and patches else None
        self.on_weight = [] if plain else patches

    def patch_weight(self, real: torch.Tensor) -> torch.Tensor:
        """The non-LoRA patches applied to a real (dequantized, float32) weight. A hook's model-as-LoRA patch reads
        the unpatched weight as ComfyUI's `original_weights`: the real weight, not the FP8 bits."""
        if not self.on_weight:
            return real
        original = None
        if any(isinstance(p[1], tuple) and len(p[1]) == 2 and p[1][0] == "model_as_lora" for p in self.on_weight):
            original = {self.key: [(real.clone(), None)]}
        return comfy.lora.calculate_weight(self.on_weight, real, self.key, intermediate_dtype=real.dtype,
                                           original_weights=original)


def drop_runtime_patches(layer, model: bool = True, hooks: bool = False) -> None:
    """Forget a layer's patches (the model's, its hooks', or both) and their split, which holds the LoRA's tensors
    (and their copies on a GPU)."""
    if model:
        layer.runtime_patches = None
    if hooks:
        layer.runtime_hook_patches = None
    layer._runtime_split = None


def runtime_patches_of(layer, held: tuple[str, list] | None) -> RuntimeWeightPatches | None:
    """The layer's split of `held` (its weight key and the model's patches; a low-VRAM layer's come each forward)
    and of its hook patches; None without either. The same lists keep their split."""
    hooked = getattr(layer, "runtime_hook_patches", None)
    if held is None and hooked is None:
        return None
    key = (held or hooked)[0]
    sources = (held[1] if held else None, hooked[1] if hooked else None)
    split = getattr(layer, "_runtime_split", None)
    if split is None or split.key != key or any(a is not b for a, b in zip(split.sources, sources, strict=True)):
        split = RuntimeWeightPatches(key, sources, layer.out_features, layer.in_features)
        layer._runtime_split = split
    return split


# set on the model while patches are merged into its FP8 weights because a load forced them (a save)
MERGED_FOR_SAVE = "sd35_fp8_merged_for_save"


class FP8LayerPatcher:
    """ModelPatcher behaviour for models with the pack's FP8 layers (mixed in before ComfyUI's class)."""

    _merge_patches = False

    @contextlib.contextmanager
    def _merging(self, force_patch_weights: bool):
        previous, self._merge_patches = self._merge_patches, bool(force_patch_weights) or self._merge_patches
        try:
            yield
        finally:
            self._merge_patches = previous

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        with self._merging(force_patch_weights):
            return super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                                force_patch_weights=force_patch_weights, full_load=full_load)

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        with self._merging(force_patch_weights):
            return super().partially_unload(device_to, memory_to_free=memory_to_free,
                                            force_patch_weights=force_patch_weights)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        if not force_patch_weights and getattr(self.model, MERGED_FOR_SAVE, False) \
                and self.model.current_weight_patches_uuid is not None:
            # a save merged the patches into FP8 weights: ComfyUI unpatches a model whose loaded patches are not
            # this patcher's, so it loads again with run-time patches (sampling after a save is what it was before)
            self.model.current_weight_patches_uuid = MERGED_FOR_SAVE
        return super().partially_load(device_to, extra_memory=extra_memory, force_patch_weights=force_patch_weights)

    def _fp8_layer(self, key: str):
        if not key.endswith(".weight"):
            return None
        try:
            layer = comfy.utils.get_attr(self.model, key[: -len(".weight")])
        except AttributeError:
            return None
        return layer if getattr(layer, "takes_runtime_patches", False) and layer.is_fp8 else None

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, *args, **kwargs):
        layer = self._fp8_layer(key)
        if layer is None:
            return super().patch_weight_to_device(key, device_to, inplace_update, *args, **kwargs)
        patches = self.patches.get(key)
        drop_runtime_patches(layer)
        if patches and (self._merge_patches or any(p[2] != 1.0 for p in patches)):
            if self._merge_patches:
                setattr(self.model, MERGED_FOR_SAVE, True)
            return super().patch_weight_to_device(key, device_to, inplace_update, *args, **kwargs)
        layer.runtime_patches = (key, patches) if patches else None

    def patch_hook_weight_to_device(self, hooks, combined_patches, key, original_weights, memory_counter):
        """A hook's patches (Create Hook LoRA and the rest) on an FP8 layer are handed to the layer like the model's
        own (ComfyUI would write W + dW into the FP8 weight, rounded with the unpatched weight's scale)."""
        layer = self._fp8_layer(key)
        if layer is None or key not in combined_patches:
            return super().patch_hook_weight_to_device(hooks, combined_patches, key, original_weights, memory_counter)
        if original_weights is not None:
            original_weights.pop(key, None)  # as ComfyUI does: only the layers still to patch keep theirs
        layer.runtime_hook_patches = (key, combined_patches[key])

    def unpatch_hooks(self, whitelist_keys_set=None):
        for key, module in self.model.named_modules():
            if getattr(module, "runtime_hook_patches", None) is not None \
                    and (not whitelist_keys_set or f"{key}.weight" in whitelist_keys_set):
                drop_runtime_patches(module, model=False, hooks=True)
        return super().unpatch_hooks(whitelist_keys_set)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            setattr(self.model, MERGED_FOR_SAVE, False)
            for module in self.model.modules():
                if getattr(module, "takes_runtime_patches", False):
                    drop_runtime_patches(module, hooks=True)
        return super().unpatch_model(device_to, unpatch_weights)


_PATCHER_CLASSES: dict[type, type] = {}


def use_fp8_patcher(patcher) -> None:
    """Make `patcher` (a fresh one, or a clone the caller owns) apply weight patches to FP8 layers at run time, and
    hook patches in MinVram mode; its clones inherit both."""
    patcher.set_hook_mode(comfy.hooks.EnumHookMode.MinVram)
    base = type(patcher)
    if issubclass(base, FP8LayerPatcher):
        return
    if base not in _PATCHER_CLASSES:
        _PATCHER_CLASSES[base] = type(f"FP8{base.__name__}", (FP8LayerPatcher, base), {})
    patcher.__class__ = _PATCHER_CLASSES[base]


def low_vram_patches(weight_function: list) -> tuple[tuple[str, list] | None, list]:
    """ComfyUI's LowVramPatch among a layer's weight functions, as (key, patches), and the other functions."""
    found, others = None, []
    for function in weight_function:
        if isinstance(function, comfy.model_patcher.LowVramPatch):
            found = (function.key, function.patches[function.key])
        else:
            others.append(function)
    return found, others
