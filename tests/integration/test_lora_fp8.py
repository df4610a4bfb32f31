"""A LoRA on an FP8 model: applied at run time, never rounded into FP8, at least as close to FP16 + LoRA as the LoRA
merged before quantizing, and undone exactly.

One denoiser call on fixed inputs, for each way ComfyUI applies a LoRA to our layers: a normal load and a low-VRAM
load (both: patches applied per forward, nodes/runtime_patches.py), and a load that forces patches into the weights
(what save nodes ask for: merged, the patched weight re-quantized once, nodes/fp8_ops.py). The reference for "as
close as" is the LoRA merged into the 16-bit weights, then quantized like the loader does ("LoRA-then-quantize").
The fixture LoRAs are strong (tests/conftest.py, write_lora): FP8's own error cannot hide what a route does.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from helpers import fp8_layers, host_quantized_layers, same_bits, snapshot
from prompts import dm_loader, encode, fp8_loader, ksampler, quantize_model, show
from safetensors.torch import save_file

from tools import comfy_host

CPU = torch.device("cpu")
STRENGTHS = (0.5, 1.0, 2.0)
MIN_EFFECT = 0.30  # the fixture LoRA moves one denoiser call, and the sampled latent, by at least this at strength 1
SAVED_MAX_RATIO = 1.05  # a saved FP8 model with a LoRA (merged, rounded once) vs LoRA-then-quantize
# ComfyUI's own FP8 layers (the stock loader on our file) merge a LoRA themselves, re-rounding W + dW into FP8:
# 1.78x LoRA-then-quantize with the fixture LoRA at strength 1 (0.3.75 and 0.8.0, 2026-12-07)
STOCK_MAX_RATIO = 2.0


def _lora(model: list, name: str, strength: float = 1.0) -> dict:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": name,
                                                             "strength_model": strength}}


def _inputs(model) -> dict:
    dm = model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    return {"x": torch.randn(1, dm.x_embedder.proj.in_channels, 8, 8, generator=gen),
            "timesteps": torch.tensor([500.0]),
            "context": torch.randn(1, 7, dm.context_embedder.in_features, generator=gen),
            "y": torch.randn(1, dm.y_embedder.mlp[0].in_features, generator=gen)}


def denoise(patcher, lowvram: bool = False, merge: bool = False) -> torch.Tensor:
    """One call of the diffusion model as `patcher` applies it: a normal load, a low-VRAM load, or (merge) a load
    that forces the patches into the weights."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        patcher.patch_model(CPU, lowvram_model_memory=1 if lowvram else 0, force_patch_weights=merge)
        try:
            if lowvram:
                assert patcher.model.model_lowvram, "the low-VRAM load did not offload"
            return patcher.model.diffusion_model(**_inputs(patcher)).float()
        finally:
            patcher.unpatch_model(CPU)


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def lora_then_quantize(pack, fp8_model, lora16_model, scaling: str | None = None):
    """`fp8_model` (the FP8 loader's) with each FP8 layer re-made from the LoRA-merged 16-bit weight, quantized
    with the same format and scaling (or `scaling`): what the loader would have built had the LoRA been in the file."""
    fp8_ops = importlib.import_module("sd35_fp8.nodes.fp8_ops")
    formats = importlib.import_module("sd35_fp8.quant.formats")
    import comfy.model_management

    layers = fp8_layers(fp8_model)
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        lora16_model.patch_model(CPU, lowvram_model_memory=0)
        merged = {name: lora16_model.get_model_object(f"diffusion_model.{name}").weight.detach().clone()
                  for name in layers}
        lora16_model.unpatch_model(CPU)
    clone = fp8_model.clone()
    ops = fp8_ops.make_fp8_ops("weight_only")
    for name, layer in layers.items():
        layer_scaling = scaling or ("per_channel" if layer.weight_scale.dim() else "per_tensor")
        qweight, scale = formats.quantize_weight(merged[name].float(), formats.format_name(layer.weight.dtype),
                                                 layer_scaling)
        clone.add_object_patch(f"diffusion_model.{name}", fp8_ops.ops_linear_holding(ops, qweight, scale, layer.bias))
    return clone


def _key(stack: str, strength: float) -> str:
    return f"{stack}@{strength}"


@pytest.fixture(scope="module")
def models(runner, fixture_files, tiny_lora, second_lora, pack) -> dict:
    """FP16 ("16:") and FP8 ("8:") models with one LoRA or two stacked at each strength, LoRA-then-quantize ("ltq:")."""
    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, "ld": fp8_loader(ckpt),
              # model strength 0 with a clip strength: ComfyUI adds the model's patches at strength 0
              "l8z": {"class_type": "LoraLoader", "inputs": {"model": ["ld", 0], "clip": ["ld", 1],
                                                              "lora_name": tiny_lora, "strength_model": 0.0,
                                                              "strength_clip": 1.0}}}
    for i, strength in enumerate(STRENGTHS):
        for base, tag in (("ck", 16), ("ld", 8)):
            prompt[f"{tag}one{i}"] = _lora([base, 0], tiny_lora, strength)
            prompt[f"{tag}two{i}"] = _lora([f"{tag}one{i}", 0], second_lora, strength)
    nodes = list(prompt)
    prompt.update({f"o_{node}": show([node, 0]) for node in nodes})
    runner.run(prompt)
    out = {node: runner.node_outputs(node)[0] for node in ("ck", "ld", "l8z")}
    for i, strength in enumerate(STRENGTHS):
        for stack in ("one", "two"):
            key = _key(stack, strength)
            out[f"16:{key}"], out[f"8:{key}"] = (runner.node_outputs(f"{tag}{stack}{i}")[0] for tag in (16, 8))
            out[f"ltq:{key}"] = lora_then_quantize(pack, out["ld"], out[f"16:{key}"])
    return out


@pytest.mark.parametrize("lowvram", [False, True], ids=["loaded", "lowvram"])
@pytest.mark.parametrize("stack", ["one", "two"])
@pytest.mark.parametrize("strength", STRENGTHS)
def test_fp8_lora_errs_no_more_than_lora_then_quantize(models, strength, stack, lowvram):
    """Quantize, then LoRA (at run time) is at least as close to FP16 + LoRA as LoRA, then quantize."""
    key = _key(stack, strength)
    ref = denoise(models[f"16:{key}"])
    effect = _error(denoise(models["ck"]), ref)
    if strength == 1.0:
        assert effect >= MIN_EFFECT, f"the LoRA moves the output by {effect:.3f} only: it would prove nothing"
    ltq = _error(denoise(models[f"ltq:{key}"]), ref)
    ours = _error(denoise(models[f"8:{key}"], lowvram=lowvram), ref)
    print(f"{comfy_host.host_label()} {stack} LoRA(s) at {strength} lowvram={lowvram}: LoRA effect {effect:.4f}, "
          f"LoRA-then-quantize {ltq:.4f}, FP8 + LoRA {ours:.4f} ({ours / ltq:.2f}x)")
    assert ours <= ltq, (ours, ltq)


def test_sampled_latent_with_lora_is_as_close_to_fp16_lora_as_lora_then_quantize(runner, fixture_files, tiny_lora,
                                                                                 pack):
    """The usual graph, FP8 loader -> LoRA -> KSampler (3 steps), and LoRA -> Quantize Model -> KSampler: their
    latents vs FP16 + LoRA's, against LoRA-then-quantize's (sampled through ComfyUI's own KSampler function)."""
    import nodes

    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck"),
              "ld": fp8_loader(ckpt), "l16": _lora(["ck", 0], tiny_lora), "l8": _lora(["ld", 0], tiny_lora)}
    prompt["qa"] = quantize_model(["l16", 0])
    for node in ("ck", "l16", "l8", "qa"):
        prompt[f"ks_{node}"] = ksampler([node, 0])
        prompt[f"o_{node}"] = show([f"ks_{node}", 0])
    runner.run(prompt)
    latent = {node: runner.node_outputs(f"ks_{node}")[0]["samples"] for node in ("ck", "l16", "l8", "qa")}
    ltq_model = lora_then_quantize(pack, runner.node_outputs("ld")[0], runner.node_outputs("l16")[0])
    inputs = [runner.node_outputs(node)[0] for node in ("p", "n", "lat")]
    with torch.inference_mode():
        ltq_latent = nodes.common_ksampler(ltq_model, 7, 3, 4.5, "euler", "sgm_uniform", *inputs)[0]["samples"]
    ref = latent["l16"]
    ltq = _error(ltq_latent, ref)
    errors = {node: _error(latent[node], ref) for node in ("l8", "qa")}
    print(f"{comfy_host.host_label()} latents: LoRA effect {_error(latent['ck'], ref):.4f}, LoRA-then-quantize "
          f"{ltq:.4f}, FP8 + LoRA {errors['l8']:.4f}, LoRA + Quantize Model {errors['qa']:.4f}")
    assert _error(latent["ck"], ref) >= MIN_EFFECT
    assert errors["l8"] <= ltq and errors["qa"] <= ltq, (errors, ltq)


@pytest.fixture
def calls(monkeypatch) -> dict:
    """fp8_matmul runs on the CPU (torch's CPU _scaled_mm takes row-wise float8 scales); the FP8 matmuls and the
    low-rank branch's calls are counted."""
    linear = importlib.import_module("sd35_fp8.quant.linear")
    branch = importlib.import_module("sd35_fp8.nodes.runtime_patches").LowRankBranch
    monkeypatch.setattr(linear, "runs_scaled_mm", lambda device: True)
    counts = {"branch": 0, "scaled_mm": 0}
    add_to, scaled_mm = branch.add_to, torch._scaled_mm

    def counted_add_to(self, out, x):
        counts["branch"] += 1
        return add_to(self, out, x)

    def counted_scaled_mm(*args, **kwargs):
        counts["scaled_mm"] += 1
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(branch, "add_to", counted_add_to)
    monkeypatch.setattr(torch, "_scaled_mm", counted_scaled_mm)
    return counts


@pytest.mark.parametrize("compute", ["weight_only", "fp8_matmul"])
def test_a_lora_is_a_branch_beside_the_fp8_matmul_and_never_touches_the_weight(models, calls, compute):
    """While a LoRA is applied (normal load), each patched FP8 layer keeps its FP8 weight and scale bit for bit, and
    its output is the layer's own FP8 output on either compute path plus the LoRA's exact update (ComfyUI's
    calculate_weight on the real weight), added by the low-rank branch."""
    import comfy.lora
    import comfy.model_management

    linear = importlib.import_module("sd35_fp8.quant.linear")
    patched = models[f"8:{_key('two', 1.0)}"]
    before = snapshot(models["ld"])
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))
    checked = 0
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        patched.patch_model(CPU, lowvram_model_memory=0)
        try:
            assert same_bits(before, {k: v.detach().clone() for k, v in
                                      patched.model.diffusion_model.state_dict().items()})
            for name, layer in fp8_layers(patched).items():
                key = f"diffusion_model.{name}.weight"
                if key not in patched.patches:
                    continue
                assert layer.runtime_patches is not None and layer.runtime_patches[0] == key
                inp = x[..., :layer.in_features] if layer.in_features <= x.shape[-1] else \
                    torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
                real = layer.weight.float() * layer.weight_scale
                delta = comfy.lora.calculate_weight(patched.patches[key], real.clone(), key) - real
                expected = linear.scaled_linear(inp, layer.weight, layer.weight_scale, layer.bias.float(), compute) \
                    + torch.nn.functional.linear(inp, delta)
                resolved = layer.__dict__.pop("_resolved_compute", None)
                layer.__dict__["_resolved_compute"] = {(str(inp.device), inp.dtype): compute}
                try:
                    before_call = dict(calls)
                    got = layer(inp)
                    assert calls["branch"] == before_call["branch"] + 1
                    assert calls["scaled_mm"] == before_call["scaled_mm"] + (compute == "fp8_matmul")
                finally:
                    layer.__dict__.pop("_resolved_compute")
                    if resolved is not None:
                        layer.__dict__["_resolved_compute"] = resolved
                assert _error(got, expected) < 1e-5, (name, _error(got, expected))
                checked += 1
        finally:
            patched.unpatch_model(CPU)
    assert checked >= 6  # qkv (six sliced patches), fc1 and attn.proj of two blocks, the second LoRA's layers
    assert same_bits(before, snapshot(models["ld"]))


@pytest.fixture(scope="module")
def other_patch_types(comfy_base, fixture_files) -> str:
    """A LyCORIS-style file: LoHa on two fc1 layers and a full diff on an attention output (ComfyUI loads both)."""
    hidden = 64 * fixture_files["manifest"]["files"]["large"]["mmdit"]["depth"]
    gen = torch.Generator().manual_seed(7)
    rank, tensors = 4, {}
    for block in (0, 1):
        key = f"diffusion_model.joint_blocks.{block}.x_block.mlp.fc1"
        for part, (rows, cols) in {"w1_a": (4 * hidden, rank), "w1_b": (rank, hidden), "w2_a": (4 * hidden, rank),
                                   "w2_b": (rank, hidden)}.items():
            tensors[f"{key}.hada_{part}"] = (torch.randn(rows, cols, generator=gen) * 0.8).half()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    tensors["diffusion_model.joint_blocks.0.x_block.attn.proj.diff"] = \
        (torch.randn(hidden, hidden, generator=gen) * 0.1).half()
    path = comfy_base / "models" / "loras" / "tiny_sd35_large_loha_diff.safetensors"
    save_file(tensors, str(path))
    return path.name


def test_other_patch_types_apply_at_run_time_on_the_dequantized_weight(runner, fixture_files, other_patch_types,
                                                                       models, pack):
    """LoHa and diff patches are not low-rank: the layer applies them to its dequantized weight in the forward.
    The FP8 weights stay as they are, and the result is as close to FP16 + the same patches as patch-then-quantize."""
    ckpt = fixture_files["large_all_in_one"].name
    runner.run({"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                "ld": fp8_loader(ckpt), "p16": _lora(["ck", 0], other_patch_types),
                "p8": _lora(["ld", 0], other_patch_types), "o16": show(["p16", 0]), "o8": show(["p8", 0])})
    p16, p8 = runner.node_outputs("p16")[0], runner.node_outputs("p8")[0]
    assert len([k for k in p8.patches if k.startswith("diffusion_model.")]) == 3
    ref = denoise(p16)
    effect = _error(denoise(models["ck"]), ref)
    ltq = _error(denoise(lora_then_quantize(pack, models["ld"], p16)), ref)
    before = snapshot(models["ld"])
    for lowvram in (False, True):
        ours = _error(denoise(p8, lowvram=lowvram), ref)
        print(f"{comfy_host.host_label()} LoHa + diff lowvram={lowvram}: effect {effect:.4f}, patch-then-quantize "
              f"{ltq:.4f}, FP8 + patches {ours:.4f} ({ours / ltq:.2f}x)")
        assert effect >= MIN_EFFECT and ours <= ltq, (effect, ours, ltq)
    assert same_bits(before, snapshot(models["ld"]))


def hook_lora(lora_path: str, strength: float):
    """What Create Hook LoRA makes of `lora_path`."""
    import comfy.hooks
    import comfy.utils

    return comfy.hooks.create_hook_lora(comfy.utils.load_torch_file(lora_path), strength_model=strength,
                                        strength_clip=0.0)


@contextlib.contextmanager
def hooks_patched(patcher, hooks):
    """A clone of `patcher` with `hooks` registered, loaded, and the hooks patched as ComfyUI's sampler patches a
    conditioning's; unloaded after."""
    import comfy.hooks
    import comfy.model_management

    hooked = patcher.clone()
    hooked.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model))
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        hooked.patch_model(CPU, lowvram_model_memory=0)
        try:
            hooked.patch_hooks(hooks)
            yield hooked
        finally:
            hooked.unpatch_model(CPU)


def denoise_hooked(patcher, hooks) -> tuple[torch.Tensor, dict]:
    """One denoiser call with `hooks` patched; and, for each FP8 layer the hooks patch, whether it held their patches
    during the call."""
    with hooks_patched(patcher, hooks) as hooked:
        held = {name: getattr(layer, "runtime_hook_patches", None) is not None
                for name, layer in fp8_layers(hooked).items()
                if f"diffusion_model.{name}.weight" in hooked.get_combined_hook_patches(hooks)}
        out = hooked.model.diffusion_model(**_inputs(hooked)).float()
        hooked.unpatch_hooks()
        assert not any(getattr(layer, "runtime_hook_patches", None) for layer in fp8_layers(hooked).values())
        return out, held


@pytest.mark.parametrize("strength", STRENGTHS)
def test_hook_lora_runs_at_run_time_as_close_as_lora_then_quantize(models, comfy_base, tiny_lora, strength):
    """A hook LoRA on the FP8 model is applied at run time like a loaded one (never written into the FP8 weight,
    which ComfyUI would round with the unpatched weight's scale): as close to FP16 + the hook as LoRA-then-quantize
    is to it, and the model is the same after."""
    path = str(comfy_base / "models" / "loras" / tiny_lora)
    before = snapshot(models["ld"])
    ref, _ = denoise_hooked(models["ck"], hook_lora(path, strength))
    ours, held = denoise_hooked(models["ld"], hook_lora(path, strength))
    key = _key("one", strength)
    ltq = _error(denoise(models[f"ltq:{key}"]), ref)
    hook_vs_loaded = _error(ref, denoise(models[f"16:{key}"]))
    print(f"{comfy_host.host_label()} hook LoRA at {strength}: FP16 hook vs FP16 LoRA {hook_vs_loaded:.2e}, "
          f"LoRA-then-quantize {ltq:.4f}, FP8 + hook {_error(ours, ref):.4f} ({_error(ours, ref) / ltq:.2f}x)")
    assert hook_vs_loaded < 1e-4  # the hook is the same LoRA: the reference is FP16 + LoRA
    assert len(held) >= 6 and all(held.values()), held
    assert _error(ours, ref) <= ltq, (_error(ours, ref), ltq)
    assert same_bits(before, snapshot(models["ld"]))


def test_hook_model_as_lora_takes_the_real_unpatched_weight_as_the_original(models):
    """Create Hook Model as LoRA adds strength * (its model's weight - the original weight). With the FP16 model as
    its model, each FP8 layer at strength 1 computes with the FP16 weight: only where the layer hands ComfyUI its
    real (dequantized) weight as the original, not its FP8 bits."""
    import comfy.hooks

    weights16 = models["ck"].model.state_dict()
    keys = [f"diffusion_model.{name}.weight" for name in fp8_layers(models["ld"])]
    weights = {key: weights16[key].float() for key in keys}
    hooks = comfy.hooks.create_hook_model_as_lora(weights, None, strength_model=1.0, strength_clip=0.0)
    before = snapshot(models["ld"])
    gen = torch.Generator().manual_seed(3)
    checked = 0
    with hooks_patched(models["ld"], hooks) as hooked:
        for patched in (True, False):
            hooked.patch_hooks(hooks if patched else None)
            for name, layer in fp8_layers(hooked).items():
                inp = torch.randn(2, 3, layer.in_features, generator=gen)
                expected = torch.nn.functional.linear(inp, weights[f"diffusion_model.{name}.weight"],
                                                      layer.bias.float())
                error = _error(layer(inp), expected)
                assert error < 1e-5 if patched else error > 1e-3, (name, patched, error)
                checked += patched
    assert checked >= 10
    assert same_bits(before, snapshot(models["ld"]))


def test_hook_lora_never_copies_a_cached_real_weight_into_fp8(runner, fixture_files, tiny_lora, monkeypatch):
    """A hook LoRA (Create Hook LoRA -> Cond Set Props) on the positive prompt only: two hook groups, so ComfyUI
    applies the hook at every step. In its default MaxSpeed mode it would, from the second step on, copy the
    patched weight it cached (real float32 values) straight into the FP8 weight; our models run hooks in MinVram
    mode, which caches nothing, and hand the hook patches to the FP8 layers (runtime_patches.FP8LayerPatcher), and
    the FP8 model is the same after."""
    import comfy.model_patcher

    ckpt = fixture_files["large_all_in_one"].name
    hook = {"class_type": "CreateHookLora", "inputs": {"lora_name": tiny_lora, "strength_model": 1.0,
                                                       "strength_clip": 0.0}}
    hooked = {"class_type": "ConditioningSetProperties", "inputs": {"cond_NEW": ["p", 0], "strength": 1.0,
                                                                     "set_cond_area": "default", "hooks": ["hk", 0]}}
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck"),
              "ld": fp8_loader(ckpt), "qa": quantize_model(["ck", 0]), "hk": hook, "ph": hooked}
    for node in ("ck", "ld", "qa"):
        sampler = ksampler([node, 0])
        sampler["inputs"]["positive"] = ["ph", 0]
        prompt[f"ks_{node}"], prompt[f"o_{node}"] = sampler, show([f"ks_{node}", 0])
    cached = []
    original = comfy.model_patcher.ModelPatcher.patch_cached_hook_weights

    def spy(self, cached_weights, key, memory_counter):
        cached.append((self.model_options.get("sd35_fp8", {}).get("source"), key))
        return original(self, cached_weights, key, memory_counter)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "patch_cached_hook_weights", spy)
    runner.run({k: v for k, v in prompt.items() if k in ("ck", "ld", "qa")} | {"o": show(["ld", 1]),
                                                                              "oq": show(["qa", 1])})
    fp8_models = [runner.node_outputs(node)[0] for node in ("ld", "qa")]
    before = [snapshot(m) for m in fp8_models]
    runner.run(prompt)
    assert [m.hook_mode.name for m in fp8_models] == ["MinVram", "MinVram"]
    assert cached and all(source is None for source, _ in cached), cached[:3]  # the stock model's only
    assert all(same_bits(b, snapshot(m)) for b, m in zip(before, fp8_models, strict=True))


def test_unpatching_restores_the_fp8_model_bit_for_bit(models):
    """Every tensor of the FP8 model, scales included, is the same after its LoRA branches ran at run time (both
    loads) and merged; no layer is left holding a patch or a patched weight's own scale; strength 0 is no LoRA."""
    plain = models["ld"]
    before, out_before = snapshot(plain), denoise(plain)
    for stack in ("one", "two"):
        for lowvram, merge in ((False, False), (True, False), (False, True)):
            denoise(models[f"8:{_key(stack, 1.0)}"], lowvram=lowvram, merge=merge)
    assert same_bits(before, snapshot(plain))
    layers = fp8_layers(plain)
    assert layers and all(getattr(m.weight, "fp8_scale", None) is None for m in layers.values())
    assert all(m.runtime_patches is None and getattr(m, "_runtime_split", None) is None for m in layers.values())
    assert torch.equal(denoise(plain), out_before)
    for lowvram in (False, True):
        assert torch.equal(denoise(models["l8z"], lowvram=lowvram), out_before), f"strength 0, lowvram={lowvram}"


def test_merged_lora_carries_its_scale_into_state_dict_and_back(models):
    """Where a merge is asked for (save nodes force patches into the weights), a patched layer's state dict (what
    Save FP8 Model and ComfyUI's save read) pairs its weight with the scale it was re-quantized with; the unpatched
    scale is back once the patch is undone."""
    import comfy.model_management

    patched = models[f"8:{_key('one', 1.0)}"]
    name = "joint_blocks.0.x_block.mlp.fc1"
    before = snapshot(models["ld"])
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        patched.patch_model(CPU, lowvram_model_memory=0, force_patch_weights=True)
        try:
            layer = patched.get_model_object(f"diffusion_model.{name}")
            sd = layer.state_dict()
            real = sd["weight"].float() * sd["weight_scale"]
        finally:
            patched.unpatch_model(CPU)
    assert not torch.equal(sd["weight_scale"], before[f"{name}.weight_scale"]), "the scale did not follow the LoRA"
    original = before[f"{name}.weight"].float() * before[f"{name}.weight_scale"]
    # the merged weight is the original plus the LoRA's update, not clipped at the old range
    rows = real.abs().amax(dim=1) > 1.05 * original.abs().amax(dim=1)  # rows whose range the LoRA widened
    assert float(rows.float().mean()) > 0.5
    assert same_bits(before, snapshot(models["ld"]))


def test_convert_weight_scales_the_bits_it_is_given_while_a_lora_is_merged(models):
    """While a LoRA is merged, ModelPatcher hands convert_weight either a copy of the layer's current (patched) bits
    or its backup of the unpatched ones (get_key_patches, used by the model-merge nodes): each is scaled with its
    own scale."""
    import comfy.model_management

    patched = models[f"8:{_key('one', 1.0)}"]
    name = "joint_blocks.0.x_block.mlp.fc1"
    before = snapshot(models["ld"])
    original_bits = before[f"{name}.weight"].float()
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        patched.patch_model(CPU, lowvram_model_memory=0, force_patch_weights=True)
        try:
            layer = patched.get_model_object(f"diffusion_model.{name}")
            current = layer.convert_weight(layer.weight.float())
            patched_scale = layer.current_scale().clone()
            expected_current = layer.weight.float() * patched_scale
            backup = layer.convert_weight(original_bits.clone())
        finally:
            patched.unpatch_model(CPU)
    assert torch.equal(current, expected_current)
    assert torch.equal(backup, original_bits * before[f"{name}.weight_scale"])
    assert not torch.equal(patched_scale, before[f"{name}.weight_scale"])  # so the two scales differ


def test_lora_on_our_saved_file_through_the_stock_loader(runner, comfy_base, fixture_files, models, tiny_lora, pack):
    """Our saved file (stock_compatible: one scale per layer) in the host's own FP8 layers: ComfyUI re-quantizes a
    LoRA-patched weight itself (a fresh per-tensor scale on both hosts); our layers are not involved."""
    save = {"model": ["ld", 0], "filename_prefix": "diffusion_models/lora_stock"}
    runner.run({"save": {"class_type": "SD35FP8SaveModel", "inputs": save},
                "ld": fp8_loader(fixture_files["large_all_in_one"].name)})
    (path,) = sorted((comfy_base / "output" / "diffusion_models").glob("lora_stock_*.safetensors"))
    name = comfy_host.link_model(comfy_base, "diffusion_models", path)
    import folder_paths

    folder_paths.filename_list_cache.clear()
    runner.run({"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
                "lora": _lora(["unet", 0], tiny_lora), "o": show(["lora", 0])})
    stock, stock_lora = runner.node_outputs("unet")[0], runner.node_outputs("lora")[0]
    ours = importlib.import_module("sd35_fp8.nodes.fp8_ops").FP8OpsLinear
    assert host_quantized_layers(stock), "the stock loader did not build its own FP8 layers"
    assert not any(isinstance(m, ours) for m in stock.model.diffusion_model.modules()), "our layers are involved"
    ref = denoise(models[f"16:{_key('one', 1.0)}"])
    ltq = _error(denoise(lora_then_quantize(pack, models["ld"], models[f"16:{_key('one', 1.0)}"], "per_tensor")), ref)
    before = snapshot(stock)
    out_before = denoise(stock)
    # the host's own FP8 error without a LoRA: 0.3.75 in FP8-device mode multiplies FP8 x FP8 (it ignores the
    # file's full-precision marking), which errs more than LoRA-then-quantize's dequantized weights
    own = _error(out_before, denoise(models["ck"]))
    for lowvram in (False, True):
        err = _error(denoise(stock_lora, lowvram=lowvram), ref)
        print(f"{comfy_host.host_label()} stock loader lowvram={lowvram}: LoRA-then-quantize (per tensor) {ltq:.4f}, "
              f"stock without LoRA {own:.4f}, stock FP8 + LoRA {err:.4f} ({err / max(ltq, own):.2f}x)")
        assert err <= STOCK_MAX_RATIO * max(ltq, own), (lowvram, err, ltq, own)
    assert same_bits(before, snapshot(stock)) and torch.equal(denoise(stock), out_before)


def _saved_and_reloaded(runner, comfy_base, source_prompt: dict, source: list, tag: str, layout: str):
    """Save FP8 Model's file of `source` (a model in `source_prompt`), read back by the pack's diffusion model
    loader (which keeps an FP8 file's own scales)."""
    import folder_paths

    save = {"model": source, "filename_prefix": f"diffusion_models/lora_{tag}", "layout": layout}
    runner.run({**source_prompt, "save": {"class_type": "SD35FP8SaveModel", "inputs": save}})
    (path,) = sorted((comfy_base / "output" / "diffusion_models").glob(f"lora_{tag}_*.safetensors"))
    name = comfy_host.link_model(comfy_base, "diffusion_models", path)
    folder_paths.filename_list_cache.clear()
    runner.run({"dm": dm_loader(name), "o": show(["dm", 0])})
    return runner.node_outputs("dm")[0]


def test_lora_routes_table(runner, comfy_base, fixture_files, models, tiny_lora, second_lora, pack):
    """The README's table: one denoiser call vs FP16 + LoRA (strength 1), for each route a LoRA can take on the FP8
    model, as a multiple of LoRA-then-quantize's error. Saved: Save FP8 Model's file (the LoRA merged, rounded once)
    read back by the pack's loader, with the model's own per-channel scales (layout auto), and, from a model loaded
    per_tensor, in the stock-compatible layout (against LoRA-then-quantize per tensor)."""
    ckpt = fixture_files["large_all_in_one"].name
    rows = {}
    for stack, loras in (("one", [tiny_lora]), ("two", [tiny_lora, second_lora])):
        key = _key(stack, 1.0)
        prompt = {"ld": fp8_loader(ckpt), "pt": fp8_loader(ckpt, scaling="per_tensor")}
        for base in ("ld", "pt"):
            source = [base, 0]
            for i, lora in enumerate(loras):
                prompt[f"{base}{i}"], source = _lora(source, lora), [f"{base}{i}", 0]
        last = len(loras) - 1
        saved_auto = _saved_and_reloaded(runner, comfy_base, prompt, [f"ld{last}", 0], f"auto_{stack}", "auto")
        saved_stock = _saved_and_reloaded(runner, comfy_base, prompt, [f"pt{last}", 0], f"stock_{stack}",
                                          "stock_compatible")
        runner.run({**prompt, "o": show([f"pt{last}", 0])})
        per_tensor = runner.node_outputs("pt")[0]
        ref = denoise(models[f"16:{key}"])
        ltq_pt = _error(denoise(lora_then_quantize(pack, per_tensor, models[f"16:{key}"])), ref)
        rows[stack] = {"LoRA, then quantize": _error(denoise(models[f"ltq:{key}"]), ref),
                       "quantize, then LoRA (run time)": _error(denoise(models[f"8:{key}"]), ref),
                       "quantize, then LoRA (low VRAM)": _error(denoise(models[f"8:{key}"], lowvram=True), ref),
                       "merged where asked (save nodes)": _error(denoise(models[f"8:{key}"], merge=True), ref),
                       "saved (layout auto), reloaded": _error(denoise(saved_auto), ref),
                       "per tensor: LoRA, then quantize": ltq_pt,
                       "per tensor: saved (stock_compatible), reloaded": _error(denoise(saved_stock), ref)}
    print(f"\n{comfy_host.host_label()}: one denoiser call vs FP16 + LoRA at strength 1 (relative L2; x LoRA-then-"
          "quantize)\n| route | one LoRA | two LoRAs |\n|---|---|---|")
    for route in rows["one"]:
        base = "per tensor: LoRA, then quantize" if route.startswith("per tensor") else "LoRA, then quantize"
        cells = (f"{row[route]:.4f} ({row[route] / row[base]:.2f}x)" for row in rows.values())
        print(f"| {route} | " + " | ".join(cells) + " |")
    for stack, row in rows.items():
        ltq = row["LoRA, then quantize"]
        assert row["quantize, then LoRA (run time)"] <= ltq and row["quantize, then LoRA (low VRAM)"] <= ltq, stack
        assert row["saved (layout auto), reloaded"] <= SAVED_MAX_RATIO * ltq, (stack, row)
        assert row["per tensor: saved (stock_compatible), reloaded"] <= \
            SAVED_MAX_RATIO * row["per tensor: LoRA, then quantize"], (stack, row)
