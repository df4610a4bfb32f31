"""memory_budget on the loaders and Quantize Model, in the real ComfyUI: the weights ComfyUI holds fit the budget,
the model samples, auto follows ComfyUI's free memory and its own sampling estimate, bad budgets are named."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import _unload_all, fp8_layers
from prompts import dm_loader, encode, fp8_loader, ksampler, quantize_model, show

from tools import comfy_host

GIB = 2**30


def _weights(model) -> int:
    """Bytes of the diffusion model's tensors as ComfyUI will hold them (object patches applied)."""
    _unload_all()
    dm = model.model.diffusion_model
    patched = {k.removeprefix("diffusion_model."): v for k, v in model.object_patches.items()}
    total = 0
    for name, module in dm.named_modules():
        if name in patched:
            continue
        for own, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if f"{name}.{own}".lstrip(".") not in patched:
                total += tensor.numel() * tensor.element_size()
    for value in patched.values():
        tensors = [value] if isinstance(value, torch.Tensor) else list(value.parameters()) + list(value.buffers())
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _report(model) -> dict:
    return model.model_options["sd35_fp8"]["report"]


def _sample(runner, prompt: dict, model: list) -> torch.Tensor:
    prompt.update(encode("ck"))
    prompt["ks"] = ksampler(model)
    prompt["out"] = show(["ks", 0])
    runner.run(prompt)
    return runner.node_outputs("ks")[0]["samples"]


def test_checkpoint_loader_fits_a_budget_between_the_preset_and_16bit(runner, fixture_files):
    ckpt = fixture_files["large_all_in_one"].name
    runner.run({"ck": fp8_loader(ckpt), "out": show(["ck", 3])})
    preset = runner.node_outputs("ck")[0]
    budget = _weights(preset) * 1.3  # as ComfyUI holds the model: in float32 on this CPU, 16-bit on GPUs
    latent = _sample(runner, {"ck": fp8_loader(ckpt, memory_budget=f"{budget / GIB:.12f}")}, ["ck", 0])
    model, report_text = runner.node_outputs("ck")[0], runner.node_outputs("ck")[3]
    report = _report(model)
    assert _weights(model) == report["budget"]["bytes"] <= budget
    assert report["budget"]["kept_16bit"] and report["budget"]["predicted_error"] > 0
    assert len(fp8_layers(model)) < len(fp8_layers(preset))
    assert "memory budget:" in report_text and "kept 16-bit by the budget" in report_text
    assert torch.isfinite(latent).all()


def test_quantize_model_auto_budget_is_comfyuis_free_memory_minus_its_sampling_estimate(runner, fixture_files,
                                                                                       monkeypatch, pack):
    import comfy.model_management

    budget = importlib.import_module("sd35_fp8.quant.budget")

    ckpt = fixture_files["large_all_in_one"].name
    runner.run({"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                "out": show(["ck", 0])})
    source = runner.node_outputs("ck")[0]
    _unload_all()
    sixteen = _weights(source)
    sampling = int(source.model.memory_required(list(budget.SAMPLING_LATENT)))  # ComfyUI's estimate, 1024x1024, cfg
    assert sampling <= budget.sampling_bytes(on_gpu=False)  # the CLI's estimate for a CPU (ComfyUI 0.8's): not less
    target = int(sixteen * 0.4)  # between all-FP8 and all-16-bit
    free = sampling + GIB // 2 + target  # margin: 512 MiB while 5% of free is less
    assert free // 20 < GIB // 2

    def fake_free(free: int):
        return lambda dev=None, torch_free_too=False: (free, free) if torch_free_too else free

    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
              "q": quantize_model(["ck", 0], memory_budget="auto"), "show": show(["q", 1])}
    monkeypatch.setattr(comfy.model_management, "get_free_memory", fake_free(free))
    runner.run(prompt)
    monkeypatch.undo()
    quantized = runner.node_outputs("q")[0]
    report = _report(quantized)
    assert report["budget"]["budget_bytes"] == target
    assert _weights(quantized) == report["budget"]["bytes"] == report["bytes_after"] <= target
    assert torch.isfinite(_sample(runner, prompt, ["q", 0])).all()  # the cached FP8 model samples
    monkeypatch.setattr(comfy.model_management, "get_free_memory", fake_free(sampling))
    with pytest.raises(comfy_host.PromptError, match=r"memory_budget: auto: .* nothing is left for the weights"):
        runner.run({"ck": prompt["ck"], "q": quantize_model(["ck", 0], memory_budget="auto", compute="weight_only"),
                    "out": show(["q", 1])})


@pytest.mark.parametrize(("budget", "message"), [
    ("lots", "memory_budget: 'lots' is not a memory budget; use empty or off"),
    ("0.000001", "memory_budget: 0.00 MiB is below the smallest this model reaches"),
])
def test_bad_budgets_are_named_with_the_fix(runner, fixture_files, budget, message):
    name = fixture_files["large_transformer"].name
    with pytest.raises(comfy_host.PromptError) as caught:
        runner.run({"ld": dm_loader(name, memory_budget=budget), "out": show(["ld", 1])})
    assert message in str(caught.value)
    # the same file loads with the budget off
    runner.run({"ld": dm_loader(name, memory_budget="off"), "out": show(["ld", 1])})
    assert _report(runner.node_outputs("ld")[0])["budget"] is None


@pytest.mark.parametrize("variant", ["sd35_medium", "sd35_large"])
def test_every_linear_of_the_full_size_architecture_has_a_measured_factor(pack, variant):
    """A layer in no group of quant/sensitivity.json would get the cautious largest factor: none of SD3.5's may.
    Both streams' blocks have their own adaLN/qkv/proj/MLP groups."""
    from tools import tiny_sd35

    group_factor = importlib.import_module("sd35_fp8.quant.budget").group_factor

    model = tiny_sd35.build_mmdit(variant, device="meta")
    groups = {n: group_factor(n, variant)[0] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert [n for n, g in groups.items() if g == "unmeasured"] == []
    for part in ("adaLN", "qkv", "proj", "mlp"):
        assert {f"x_{part}", f"context_{part}"} <= set(groups.values())
    assert groups["joint_blocks.0.context_block.attn.qkv"] == "context_qkv"
    assert groups["joint_blocks.0.x_block.adaLN_modulation.1"] == "x_adaLN"
