"""Bad inputs and faults, through the real ComfyUI executor (issue 7).

Each bad input must fail with an error that names the input and the fix, and the host must go on:
the next good prompt runs. A failure or interrupt while quantizing or saving must leave the cached
upstream MODEL bit-for-bit as it was (sampling it again gives the same latent bits) and no partial
file; existing files are never overwritten. Pickle files are refused unread.
"""

from __future__ import annotations

import errno
import importlib
import itertools
import json
import os
import pickle
import re
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import clip_weights, fp8_layers, snapshot
from prompts import dm_loader, encode, fp8_loader, our_sampler, quantize_model, show
from safetensors.torch import load_file, save_file

from tools import comfy_host
from tools.faults import fail_tensor_map

SUB = "reliability"  # our bad files live in models/<folder>/reliability/
NAN_LAYER = "joint_blocks.1.x_block.mlp.fc1"
INF_LAYER = "joint_blocks.0.context_block.attn.qkv"
_health = itertools.count()


# --------------------------------------------------------------------------- helpers

def error_of(runner, prompt: dict) -> str:
    """Run a prompt that must fail; return ComfyUI's error text (validation or execution)."""
    with pytest.raises(comfy_host.PromptError) as caught:
        runner.run(prompt)
    return str(caught.value)


def assert_serving(runner, fixture_files) -> None:
    """The next good prompt runs: load + quantize the tiny transformer (fresh input, so it really executes)."""
    name = fixture_files["large_transformer"].name
    runner.run({"ld": dm_loader(name, protect_patterns=f"# health check {next(_health)}"), "out": show(["ld", 1])})
    model, report = runner.node_outputs("ld")
    assert fp8_layers(model) and "fp8" in report


def pack_module(suffix: str):
    """One of our modules, as ComfyUI runs it (the pack is imported once, as `sd35_fp8`)."""
    return importlib.import_module(f"sd35_fp8.{suffix}")


def exact_bits(model) -> dict[str, torch.Tensor]:
    """The diffusion model's tensors as raw bytes (NaN-safe bit comparison)."""
    return {k: v.contiguous().view(torch.uint8).clone() for k, v in snapshot(model).items()}


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextmanager
def progress_hook(fn):
    """Call fn(value, total) on every ComfyUI progress update while the block runs."""
    import comfy.model_management
    import comfy.utils

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: fn(value, total))
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)  # never leak a pending interrupt


def _header_file(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


class Exploit:
    """Unpickling this creates the marker file: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------- bad files

@pytest.fixture(scope="module")
def bad(comfy_base, fixture_files, tmp_path_factory) -> dict:
    """Bad model files under models/checkpoints/reliability and models/diffusion_models/reliability."""
    import folder_paths

    tmp = tmp_path_factory.mktemp("reliability")
    dm = comfy_base / "models" / "diffusion_models" / SUB
    ck = comfy_base / "models" / "checkpoints" / SUB
    dm.mkdir(exist_ok=True)
    ck.mkdir(exist_ok=True)
    data = fixture_files["large_transformer"].read_bytes()
    (dm / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (dm / "empty.safetensors").write_bytes(b"")
    (dm / "garbage.safetensors").write_bytes(bytes(range(256)) * 64)
    (dm / "broken_json.safetensors").write_bytes(data.replace(b'"shape":[', b'"shape":{', 1))
    _header_file(dm / "null_offsets.safetensors", {"w": {"dtype": "F16", "shape": [2], "data_offsets": None}},
                 b"\0" * 4)
    _header_file(dm / "bad_dtype.safetensors", {"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4)
    _header_file(dm / "short_tensor.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}},
                 b"\0" * 4)
    with open(fixture_files["large_all_in_one"], "rb") as f:
        (ck / "truncated.safetensors").write_bytes(f.read(1 << 20))
    for folder in (dm, ck):  # listed by ComfyUI, but the file behind it is gone
        (folder / "gone.safetensors").unlink(missing_ok=True)
        (folder / "gone.safetensors").symlink_to(tmp / "deleted.safetensors")

    marker = tmp / "unpickled_marker"
    payload = pickle.dumps({"state_dict": Exploit(marker)})
    for folder, name in ((ck, "evil.ckpt"), (ck, "evil.pt"), (dm, "evil.bin"), (dm, "evil.pth"),
                         (dm, "evil_pickle.safetensors")):
        (folder / name).write_bytes(payload)
    torch.save({"state_dict": Exploit(marker)}, dm / "evil_zip.safetensors")

    sd = load_file(str(fixture_files["large_transformer"]))
    nan = dict(sd)
    nan[f"{NAN_LAYER}.weight"] = sd[f"{NAN_LAYER}.weight"].clone()
    nan[f"{NAN_LAYER}.weight"][3, 5] = float("nan")
    save_file(nan, str(dm / "nan.safetensors"))
    inf = dict(sd)
    inf[f"{INF_LAYER}.weight"] = sd[f"{INF_LAYER}.weight"].clone()
    inf[f"{INF_LAYER}.weight"][0, 0] = float("-inf")
    save_file(inf, str(dm / "inf.safetensors"))

    # Same function, extreme magnitudes: every qkv (weight and bias) x1e5, every attention output proj x1e-5.
    # q and k go through RMS norm, v and proj cancel, so the model computes what the original does; stored in
    # float32 (1e-5 x a weight is below float16's range).
    scaled = {k: v.float() for k, v in sd.items()}
    for key in scaled:
        if ".attn.qkv." in key:
            scaled[key] = scaled[key] * 1e5
        elif key.endswith(".attn.proj.weight"):
            scaled[key] = scaled[key] * 1e-5
    save_file(scaled, str(dm / "huge_range.safetensors"))
    save_file({k: v.float() for k, v in sd.items()}, str(dm / "fp32.safetensors"))

    not_sd3 = {"input_blocks.0.0.weight": torch.randn(32, 4, 3, 3), "input_blocks.0.0.bias": torch.zeros(32),
               "time_embed.0.weight": torch.randn(128, 32) * 0.02, "time_embed.0.bias": torch.zeros(128),
               "time_embed.2.weight": torch.randn(128, 128) * 0.02, "time_embed.2.bias": torch.zeros(128),
               "out.2.weight": torch.randn(4, 32, 3, 3) * 0.02, "out.2.bias": torch.zeros(4)}
    save_file({k: v.half() for k, v in not_sd3.items()}, str(dm / "not_sd3.safetensors"))
    folder_paths.filename_list_cache.clear()
    return {"dm": dm, "ck": ck, "marker": marker, "payload": payload}


# --------------------------------------------------------------------------- missing and corrupt files

def test_unknown_name_is_rejected_by_validation(runner, fixture_files, bad):
    text = error_of(runner, {"ld": dm_loader("no_such_model.safetensors"), "out": show(["ld", 1])})
    assert "Value not in list" in text and "model_name" in text and "no_such_model.safetensors" in text
    assert_serving(runner, fixture_files)


@pytest.mark.parametrize("node", ["checkpoint", "diffusion"])
def test_listed_but_missing_file_names_the_input(runner, fixture_files, bad, node):
    name = f"{SUB}/gone.safetensors"
    prompt = {"ld": fp8_loader(name) if node == "checkpoint" else dm_loader(name), "out": show(["ld", 1])}
    text = error_of(runner, prompt)
    input_name = "ckpt_name" if node == "checkpoint" else "model_name"
    assert f"{input_name}: {name} is not in models/" in text and "put the .safetensors file back" in text
    assert_serving(runner, fixture_files)


@pytest.mark.parametrize("name,why", [
    ("truncated", "is truncated or corrupt .*ends past the end of the file"),
    ("empty", "is empty or truncated \\(0 bytes\\)"),
    ("garbage", "is not a valid safetensors file \\(header length"),
    ("broken_json", "has a corrupt safetensors header"),
    ("null_offsets", "invalid data_offsets None"),
    ("bad_dtype", "unknown dtype 'Q9'"),
    ("short_tensor", "4 bytes for shape \\[4\\] of F32"),
])
def test_corrupt_safetensors_name_the_input_and_the_fix(runner, fixture_files, bad, name, why):
    file = f"{SUB}/{name}.safetensors"
    text = error_of(runner, {"ld": dm_loader(file), "out": show(["ld", 1])})
    assert f"model_name: {name}.safetensors " in text and "re-download it" in text, text
    assert re.search(why, text), text
    assert_serving(runner, fixture_files)


def test_truncated_checkpoint_names_ckpt_name(runner, fixture_files, bad):
    text = error_of(runner, {"ld": fp8_loader(f"{SUB}/truncated.safetensors"), "out": show(["ld", 3])})
    assert "ckpt_name: truncated.safetensors is truncated or corrupt" in text and "re-download it" in text
    assert_serving(runner, fixture_files)


# --------------------------------------------------------------------------- pickle files

def test_pickle_payload_is_live(bad, tmp_path):
    """The bait works: unpickling it (in a throwaway process) creates a marker file."""
    marker = tmp_path / "marker"
    payload = pickle.dumps({"state_dict": Exploit(marker)})
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=payload, check=True, timeout=60)
    assert marker.exists()


@pytest.mark.parametrize("node,name", [
    ("checkpoint", "evil.ckpt"), ("checkpoint", "evil.pt"), ("diffusion", "evil.bin"), ("diffusion", "evil.pth"),
    ("diffusion", "evil_pickle.safetensors"), ("diffusion", "evil_zip.safetensors"),
])
def test_pickle_files_are_refused_unread(runner, fixture_files, bad, node, name):
    file = f"{SUB}/{name}"
    prompt = {"ld": fp8_loader(file) if node == "checkpoint" else dm_loader(file), "out": show(["ld", 1])}
    text = error_of(runner, prompt)
    input_name = "ckpt_name" if node == "checkpoint" else "model_name"
    assert f"{input_name}: {name} is a pickle" in text and "never unpickles" in text and ".safetensors" in text
    assert not bad["marker"].exists(), "a pickle was unpickled"
    assert_serving(runner, fixture_files)


# --------------------------------------------------------------------------- wrong model, patterns, compute

def test_sd35_preset_on_a_non_sd3_file_says_use_auto(runner, fixture_files, bad):
    file = f"{SUB}/not_sd3.safetensors"
    text = error_of(runner, {"ld": dm_loader(file, protect_preset="sd35_large"), "out": show(["ld", 1])})
    assert "protect_preset: sd35_large is for SD3.5 (MMDiT) models and this model is not one" in text
    assert "use protect_preset=auto" in text
    text = error_of(runner, {"ld": dm_loader(file), "out": show(["ld", 1])})
    assert f"model_name: {file} is not a diffusion model ComfyUI recognises" in text
    assert_serving(runner, fixture_files)


def test_wrong_sd35_preset_warns_in_the_report(runner, fixture_files):
    runner.run({"ld": dm_loader(fixture_files["medium_transformer"].name, protect_preset="sd35_large"),
                "out": show(["ld", 1])})
    assert "protect_preset sd35_large chosen but the weights look like sd35_medium" in runner.node_outputs("ld")[1]


@pytest.mark.parametrize("pattern,why", [
    ("re:(", "protect_patterns line 1: 're:\\(' is not a valid regex"),
    ("final_layer.*\nre:", "protect_patterns line 2: 're:' is an empty regex"),
    ("joint blocks.1", "protect_patterns line 1: 'joint blocks.1' contains whitespace"),
    ("joint_blocks.[01", "unbalanced '\\['"),
])
@pytest.mark.parametrize("node", ["loader", "quantize"])
def test_invalid_patterns_name_the_line(runner, fixture_files, pattern, why, node):
    name = fixture_files["large_transformer"].name
    if node == "loader":
        prompt = {"ld": dm_loader(name, protect_patterns=pattern), "out": show(["ld", 1])}
    else:
        prompt = {"ld": dm_loader(name), "q": quantize_model(["ld", 0], protect_patterns=pattern),
                  "out": show(["q", 1])}
    text = error_of(runner, prompt)
    assert re.search(why, text), text
    assert_serving(runner, fixture_files)


def test_empty_and_comment_patterns_change_nothing(runner, fixture_files):
    name = fixture_files["large_transformer"].name
    layers = []
    for patterns in ("", "\n   \n", "# only a comment\n\n"):
        runner.run({"ld": dm_loader(name, protect_patterns=patterns), "out": show(["ld", 1])})
        model, report = runner.node_outputs("ld")
        layers.append(sorted(fp8_layers(model)))
        assert "user pattern" not in report and "warning" not in report.lower()
    assert layers[0] and layers[0] == layers[1] == layers[2]


def test_pattern_matching_nothing_is_a_warning_not_an_error(runner, fixture_files):
    name = fixture_files["large_transformer"].name
    runner.run({"ld": dm_loader(name), "out": show(["ld", 1])})
    default = sorted(fp8_layers(runner.node_outputs("ld")[0]))
    runner.run({"ld": dm_loader(name, protect_patterns="no_such_block.*"), "out": show(["ld", 1])})
    model, report = runner.node_outputs("ld")
    assert "protect_patterns line 1: 'no_such_block.*' matches no layer" in report
    assert sorted(fp8_layers(model)) == default


@pytest.mark.parametrize("node", ["checkpoint", "diffusion", "quantize"])
def test_fp8_matmul_on_a_cpu_is_a_clear_error(runner, fixture_files, node):
    if node == "checkpoint":
        prompt = {"ld": fp8_loader(fixture_files["large_all_in_one"].name, compute="fp8_matmul"),
                  "out": show(["ld", 3])}
    elif node == "diffusion":
        prompt = {"ld": dm_loader(fixture_files["large_transformer"].name, compute="fp8_matmul"),
                  "out": show(["ld", 1])}
    else:
        prompt = {"ld": dm_loader(fixture_files["large_transformer"].name),
                  "q": quantize_model(["ld", 0], compute="fp8_matmul"), "out": show(["q", 1])}
    text = error_of(runner, prompt)
    assert "compute: fp8_matmul cannot run on cpu" in text and "Use compute=auto or weight_only" in text
    assert_serving(runner, fixture_files)


# --------------------------------------------------------------------------- NaN / Inf and extreme magnitudes

@pytest.mark.parametrize("file,layer,count", [("nan", NAN_LAYER, 1), ("inf", INF_LAYER, 1)])
def test_nan_or_inf_weight_names_the_layer_and_protect_patterns(runner, fixture_files, bad, file, layer, count):
    name = f"{SUB}/{file}.safetensors"
    text = error_of(runner, {"ld": dm_loader(name), "out": show(["ld", 1])})
    assert f"{layer}: weight holds {count} NaN/Inf value(s)" in text
    assert f"add '{layer}' to protect_patterns" in text and "Re-download it" in text
    assert_serving(runner, fixture_files)
    # following the advice loads it, with that layer kept as stored
    runner.run({"ld": dm_loader(name, protect_patterns=layer), "out": show(["ld", 1])})
    model, report = runner.node_outputs("ld")
    assert layer not in fp8_layers(model) and len(fp8_layers(model)) > 0
    assert any(line.split()[:1] == [layer] and "protected" in line for line in report.splitlines()), report


def test_nan_weight_in_a_loaded_model_fails_quantize_and_leaves_it_unchanged(runner, fixture_files, bad):
    prompt = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{SUB}/nan.safetensors",
                                                              "weight_dtype": "default"}},
              "q": quantize_model(["unet", 0]), "out": show(["q", 1])}
    runner.run({"unet": prompt["unet"], "out": {"class_type": "PreviewAny", "inputs": {"source": ["unet", 0]}}})
    model = runner.node_outputs("unet")[0]
    before = exact_bits(model)
    text = error_of(runner, prompt)
    assert f"{NAN_LAYER}: weight holds 1 NaN/Inf value(s)" in text and "protect_patterns" in text
    assert runner.node_outputs("unet")[0] is model and same_bytes(before, exact_bits(model))
    assert_serving(runner, fixture_files)


def test_extreme_magnitudes_quantize_finite_in_both_formats(runner, fixture_files, bad):
    """Weights of 1e4 (beyond e4m3's 448) and 1e-7 (below both formats' subnormals) in one model: the scales
    absorb them; a bare cast would clip the first to +-448 and flush the second to zero."""
    formats = pack_module("quant.formats")  # the engine as ComfyUI imported it: one copy in the process
    fp8_dtype, relative_error = formats.fp8_dtype, formats.relative_error
    huge = load_file(str(bad["dm"] / "huge_range.safetensors"))
    qkv, proj = huge[f"{INF_LAYER}.weight"], huge["joint_blocks.0.x_block.attn.proj.weight"]
    assert float(qkv.abs().max()) > 1e4 and float(proj.abs().max()) < 1e-5
    assert relative_error(qkv, qkv.to(fp8_dtype("float8_e4m3fn")).float()) > 0.9  # clipped to 448
    for fmt in ("float8_e4m3fn", "float8_e5m2"):
        assert relative_error(proj, proj.to(fp8_dtype(fmt)).float()) > 0.9  # (nearly) all flushed to zero

    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck")}
    for fmt in ("float8_e4m3fn", "float8_e5m2"):
        for tag, file in (("ref", "fp32"), ("huge", "huge_range")):
            prompt[f"ld_{tag}_{fmt}"] = dm_loader(f"{SUB}/{file}.safetensors", fp8_format=fmt)
            prompt[f"s_{tag}_{fmt}"] = our_sampler([f"ld_{tag}_{fmt}", 0])
            prompt[f"o_{tag}_{fmt}"] = show([f"s_{tag}_{fmt}", 1])
    runner.run(prompt)
    for fmt in ("float8_e4m3fn", "float8_e5m2"):
        model, report = runner.node_outputs(f"ld_huge_{fmt}")
        layers = fp8_layers(model)
        assert "joint_blocks.0.x_block.attn.proj" in layers and INF_LAYER in layers
        for layer in layers.values():
            assert torch.isfinite(layer.weight.float()).all() and torch.isfinite(layer.weight_scale).all()
        ref_scale = fp8_layers(runner.node_outputs(f"ld_ref_{fmt}")[0])[INF_LAYER].weight_scale
        assert torch.allclose(layers[INF_LAYER].weight_scale, ref_scale * 1e5, rtol=1e-5)
        huge_latent = runner.node_outputs(f"s_huge_{fmt}")[0]["samples"]
        ref_latent = runner.node_outputs(f"s_ref_{fmt}")[0]["samples"]
        assert torch.isfinite(huge_latent).all()
        rel = float((huge_latent - ref_latent).norm() / ref_latent.norm())
        assert rel < 1e-3, (fmt, rel)  # the same function, quantized the same way up to the scale's rounding


# --------------------------------------------------------------------------- Compare and sampler inputs

def _images(a: tuple[int, int, int], b: tuple[int, int, int]) -> dict:
    return {"a": {"class_type": "EmptyImage", "inputs": {"width": a[0], "height": a[1], "batch_size": a[2],
                                                         "color": 0}},
            "b": {"class_type": "EmptyImage", "inputs": {"width": b[0], "height": b[1], "batch_size": b[2],
                                                         "color": 0x102030}},
            "cmp": {"class_type": "SD35FP8CompareImages", "inputs": {"image_a": ["a", 0], "image_b": ["b", 0]}},
            "out": show(["cmp", 3])}


@pytest.mark.parametrize("a,b,why", [
    ((64, 64, 2), (64, 64, 1), "image_a has 2 image\\(s\\) but image_b has 1: compare batches of the same size"),
    ((64, 64, 1), (64, 48, 1), "image_a is 64x64 .* but image_b is 64x48 .*resize one with ImageScale"),
    ((8, 8, 1), (8, 8, 1), "image_a/image_b: SSIM needs images of at least 11x11 pixels"),
])
def test_compare_mismatches_name_both_inputs(runner, fixture_files, a, b, why):
    text = error_of(runner, _images(a, b))
    assert re.search(why, text), text
    runner.run(_images((32, 32, 2), (32, 32, 2)))
    ssim, psnr, diff, report = runner.node_outputs("cmp")
    assert 0 < ssim < 1 and 0 < psnr < 60 and tuple(diff.shape) == (2, 32, 32, 3)


@pytest.mark.parametrize("field,value,kind", [
    ("steps", 0, "value_smaller_than_min"), ("steps", 10001, "value_bigger_than_max"),
    ("cfg", -1.0, "value_smaller_than_min"), ("cfg", 101.0, "value_bigger_than_max"),
    ("shift", -0.5, "value_smaller_than_min"), ("denoise", 1.5, "value_bigger_than_max"),
    ("seed", -1, "value_smaller_than_min"), ("skip_scale", 11.0, "value_bigger_than_max"),
    ("skip_end", 2.0, "value_bigger_than_max"), ("sampler_name", "warp_drive", "value_not_in_list"),
    ("preset", "sd4", "value_not_in_list"),
])
def test_out_of_range_sampler_settings_fail_validation_naming_the_input(runner, fixture_files, field, value, kind):
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple",
                     "inputs": {"ckpt_name": fixture_files["large_all_in_one"].name}}, **encode("ck"),
              "s": our_sampler(["ck", 0]), "out": show(["s", 1])}
    prompt["s"]["inputs"][field] = value
    with pytest.raises(comfy_host.PromptError) as caught:
        runner.validate(prompt)
    errors = caught.value.details["node_errors"]["s"]["errors"]
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [(kind, field)]


@pytest.mark.parametrize("skip,why", [
    ({"skip_layers": "7,x"}, "skip_layers: '7,x' is not a list of block numbers; write it like 7,8,9"),
    ({"skip_layers": "1;2"}, "skip_layers: '1;2' is not a list of block numbers"),
    ({"skip_layers": "1,5"}, "skip_layers: block\\(s\\) \\[5\\] do not exist in this 2-block model; use numbers "
                             "from 0 to 1"),
    ({"skip_layers": "1", "skip_start": 0.5, "skip_end": 0.2}, "skip_start \\(0.5\\) must be below skip_end"),
])
def test_bad_skip_layer_settings_name_the_input(runner, fixture_files, skip, why):
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple",
                     "inputs": {"ckpt_name": fixture_files["large_all_in_one"].name}}, **encode("ck"),
              "s": our_sampler(["ck", 0], **skip), "out": show(["s", 1])}
    text = error_of(runner, prompt)
    assert re.search(why, text), text
    prompt["s"] = our_sampler(["ck", 0], skip_layers="1", skip_start=0.0, skip_end=1.0)
    runner.run(prompt)
    assert torch.isfinite(runner.node_outputs("s")[0]["samples"]).all()


# --------------------------------------------------------------------------- faults while quantizing

def _fp16_sample_prompt(ckpt: str, tag: float) -> dict:
    """Sample the cached checkpoint model. skip_scale is unused without skip_layers: changing it only makes
    ComfyUI run the sampler again (a new input), with exactly the same math."""
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck")}
    prompt["s16"] = our_sampler(["ck", 0], steps=2, skip_scale=tag)
    prompt["out16"] = show(["s16", 1])
    return prompt


def _quantize_prompt(ckpt: str, tag: int) -> dict:
    prompt = _fp16_sample_prompt(ckpt, 0.0)
    del prompt["s16"], prompt["out16"]
    prompt["q"] = quantize_model(["ck", 0], protect_patterns=f"# attempt {tag}")
    prompt["s8"] = our_sampler(["q", 0], steps=2)
    prompt["out8"] = show(["s8", 1])
    return prompt


@pytest.mark.parametrize("fault", ["interrupt", "error"])
def test_fault_mid_quantize_leaves_cached_model_unchanged(runner, fixture_files, fault, monkeypatch):
    import comfy.model_management

    ckpt = fixture_files["large_all_in_one"].name
    runner.run(_fp16_sample_prompt(ckpt, 1.0))
    model = runner.node_outputs("ck")[0]
    latent_before = runner.node_outputs("s16")[0]["samples"].clone()
    bits_before = exact_bits(model)
    seen = []

    def on_progress(value: int, total: int) -> None:
        seen.append((value, total))
        if fault == "interrupt" and len(seen) == 3:
            comfy.model_management.interrupt_current_processing(True)

    if fault == "error":
        plan = pack_module("quant.plan")  # where every driver quantizes a weight
        real = plan.quantize_weight_with_error
        calls = itertools.count(1)

        def failing(weight, *args, **kwargs):
            if next(calls) == 4:
                raise RuntimeError("simulated failure: out of memory")
            return real(weight, *args, **kwargs)

        monkeypatch.setattr(plan, "quantize_weight_with_error", failing)
    with progress_hook(on_progress):
        text = error_of(runner, _quantize_prompt(ckpt, 1 if fault == "interrupt" else 2))
    monkeypatch.undo()
    events = [event for event, _ in runner.executor.status_messages]
    if fault == "interrupt":
        assert "execution_interrupted" in events and "SD35FP8QuantizeModel" in text
    else:
        assert "execution_error" in events and "simulated failure: out of memory" in text
    total = seen[0][1]
    assert total > 10 and seen[-1][0] < total, f"the fault did not hit mid-quantize: {seen}"

    assert runner.node_outputs("ck")[0] is model, "the cached upstream model was replaced"
    assert same_bytes(bits_before, exact_bits(model)), "the cached upstream model's tensors changed"
    assert not model.object_patches, "the upstream model gained object patches"
    runner.run(_fp16_sample_prompt(ckpt, 2.0))
    assert runner.node_outputs("ck")[0] is model
    assert torch.equal(runner.node_outputs("s16")[0]["samples"], latent_before), "sampling it changed"
    runner.run(_quantize_prompt(ckpt, 3))  # and the same quantize runs through now
    assert fp8_layers(runner.node_outputs("q")[0])


def test_interrupt_mid_load_then_the_same_load_works(runner, fixture_files):
    import comfy.model_management

    name = fixture_files["large_transformer"].name
    prompt = {"ld": dm_loader(name, protect_patterns="# interrupted load"), "out": show(["ld", 1])}
    seen = []

    def on_progress(value: int, total: int) -> None:
        seen.append((value, total))
        if len(seen) == 5:
            comfy.model_management.interrupt_current_processing(True)

    with progress_hook(on_progress):
        error_of(runner, prompt)
    assert "execution_interrupted" in [event for event, _ in runner.executor.status_messages]
    assert 5 <= len(seen) < seen[-1][1]
    runner.run(prompt)
    first = {k: m.weight.clone() for k, m in fp8_layers(runner.node_outputs("ld")[0]).items()}
    runner.run({"ld": dm_loader(name, protect_patterns="# a fresh load"), "out": show(["ld", 1])})
    second = fp8_layers(runner.node_outputs("ld")[0])
    assert first.keys() == second.keys() and all(torch.equal(first[k].view(torch.uint8),
                                                              second[k].weight.view(torch.uint8)) for k in first)


# --------------------------------------------------------------------------- faults while saving

def _lora_graph(fixture_files, lora: str) -> dict:
    return {"ld": dm_loader(fixture_files["large_transformer"].name),
            "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["ld", 0], "lora_name": lora,
                                                                      "strength_model": 1.0}}}


def _sample_lora(fixture_files, lora: str, tag: float) -> dict:
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple",
                     "inputs": {"ckpt_name": fixture_files["large_all_in_one"].name}},
              **encode("ck"), **_lora_graph(fixture_files, lora)}
    prompt["s"] = our_sampler(["lora", 0], steps=2, skip_scale=tag)
    prompt["out"] = show(["s", 1])
    return prompt


def _save(fixture_files, lora: str, prefix: str) -> dict:
    return {**_lora_graph(fixture_files, lora),
            "save": {"class_type": "SD35FP8SaveModel", "inputs": {"model": ["lora", 0], "filename_prefix": prefix}}}


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.mark.parametrize("fault", ["disk_full", "interrupt", "name_taken"])
def test_fault_mid_save_leaves_no_file_and_overwrites_nothing(runner, comfy_base, fixture_files, tiny_lora, fault,
                                                              monkeypatch):
    import comfy.model_management

    out_dir = comfy_base / "output" / "faults"
    prefix = f"faults/{fault}"
    runner.run(_sample_lora(fixture_files, tiny_lora, 1.0))
    model = runner.node_outputs("lora")[0]
    latent_before = runner.node_outputs("s")[0]["samples"].clone()
    runner.run(_save(fixture_files, tiny_lora, prefix))  # one good save: an existing file to protect
    existing = _listing(out_dir)
    assert [n for n in existing if n.startswith(fault)] == [f"{fault}_00001_.safetensors"]

    checkpoint = pack_module("quant.checkpoint")
    real_save = checkpoint.save_file

    def faulty_save(tensors, filename, metadata=None):
        if fault == "name_taken":  # another writer takes the final name while we write the temp file
            real_save(tensors, filename, metadata=metadata)
            final = Path(filename).name[1:].removesuffix(".part").rsplit(".", 1)[0]
            (Path(filename).parent / final).write_bytes(b"someone else's file")
            return
        with open(filename, "wb") as f:
            f.write(b"half a file")
        if fault == "interrupt":
            raise comfy.model_management.InterruptProcessingException()
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(checkpoint, "save_file", faulty_save)
    # the same target spelled differently, so ComfyUI runs the save node again
    text = error_of(runner, _save(fixture_files, tiny_lora, f"faults/./{fault}"))
    monkeypatch.undo()
    events = [event for event, _ in runner.executor.status_messages]
    after = _listing(out_dir)
    if fault == "name_taken":
        assert "nothing was overwritten" in text and "run it again" in text
        taken = f"{fault}_00002_.safetensors"
        assert after.pop(taken) == b"someone else's file", "the other writer's file was overwritten"
    elif fault == "interrupt":
        assert "execution_interrupted" in events
    else:
        assert "No space left on device (simulated)" in text
    assert after == existing, "a partial or temporary file was left behind, or an existing file changed"
    assert not [n for n in os.listdir(out_dir) if n.endswith(".part")]

    runner.run(_sample_lora(fixture_files, tiny_lora, 2.0))
    assert runner.node_outputs("lora")[0] is model
    assert torch.equal(runner.node_outputs("s")[0]["samples"], latent_before), "the saved model changed"
    runner.run(_save(fixture_files, tiny_lora, f"faults/{fault}/../{fault}"))  # and a good save works again
    final = _listing(out_dir)
    counter = 3 if fault == "name_taken" else 2
    assert sorted(set(final) - set(existing)) == sorted({f"{fault}_{counter:05}_.safetensors"} |
                                                         ({f"{fault}_00002_.safetensors"} if counter == 3 else set()))
    assert all(final[n] == existing[n] for n in existing), "an existing file was overwritten"


@pytest.mark.parametrize("shard", ["../outside.safetensors", "diffusion_pytorch_model.bin"])
def test_diffusers_index_naming_other_files_is_refused(runner, comfy_base, fixture_files, shard):
    """A diffusers folder's weight index may only name .safetensors shards beside it: no path out of the
    folder, no pickle shard (comfy.utils.load_torch_file would torch.load anything not .safetensors)."""
    name = f"bad_index_{'escape' if shard.startswith('..') else 'bin'}"
    transformer = comfy_base / "models" / "diffusion_models" / name / "transformer"
    transformer.mkdir(parents=True, exist_ok=True)
    (transformer / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"pos_embed.proj.weight": shard}}))
    (transformer.parent / "outside.safetensors").write_bytes(fixture_files["large_transformer"].read_bytes())
    text = error_of(runner, {"ld": dm_loader(name), "out": show(["ld", 1])})
    assert f"model_name: {name}'s weight index names {shard!r}; only .safetensors files" in text, text
    assert_serving(runner, fixture_files)


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP], ids=errno.errorcode.get)
def test_save_where_the_drive_refuses_hard_links(runner, comfy_base, fixture_files, tiny_lora, monkeypatch, code):
    """exFAT/FAT32 drives (EPERM) and many network shares (ENOTSUP) have no hard links: Save FP8 Model still writes
    the file, never over another, and leaves nothing else behind."""
    out_dir = comfy_base / "output" / f"no_links_{code}"
    asked = []

    def refuse(src, dst, *args, **kwargs):
        asked.append(os.path.basename(dst))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", refuse)
    runner.run(_save(fixture_files, tiny_lora, f"no_links_{code}/m"))
    first = _listing(out_dir)
    runner.run(_save(fixture_files, tiny_lora, f"no_links_{code}/./m"))  # again: the next name, the first kept
    monkeypatch.undo()
    assert asked == ["m_00001_.safetensors", "m_00002_.safetensors"]
    after = _listing(out_dir)
    assert sorted(after) == ["m_00001_.safetensors", "m_00002_.safetensors"], "a temp file or a claim was left"
    assert after["m_00001_.safetensors"] == first["m_00001_.safetensors"]
    runner.run(_save(fixture_files, tiny_lora, f"no_links_{code}/linked"))  # the same save where links work
    linked = _file_bytes(out_dir / "linked_00001_.safetensors")
    for name in ("m_00001_.safetensors", "m_00002_.safetensors"):
        saved = _file_bytes(out_dir / name)
        assert saved.keys() == linked.keys() and all(torch.equal(saved[k], linked[k]) for k in saved), name


def _file_bytes(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as raw bytes (its header's metadata order varies from save to save)."""
    return {k: v.reshape(-1).view(torch.uint8) for k, v in load_file(str(path)).items()}


# --------------------------------------------------------------------------- faults while reading a model file

CHECKPOINT_SITES = ("checkpoint", "text_encoders", "disabled")  # the checkpoint loader: its model, text encoders,
# and fp8_format=disabled (ComfyUI reads the file); the diffusion model loader: a file, and a diffusers folder
READ_SITES = (*CHECKPOINT_SITES, "diffusion", "diffusers")
READ_PREFIX = {"checkpoint": "model.diffusion_model.", "text_encoders": "text_encoders."}  # where each site fails


def _read_loader(fixture_files, site: str, tag: str) -> dict:
    comment = f"# read fault {tag}"  # a new input: ComfyUI runs the loader again
    if site in CHECKPOINT_SITES:
        fmt = "disabled" if site == "disabled" else "float8_e4m3fn"
        return fp8_loader(fixture_files["large_all_in_one"].name, fp8_format=fmt, protect_patterns=comment)
    name = fixture_files["large_transformer" if site == "diffusion" else "medium_diffusers"].name
    return dm_loader(name, protect_patterns=comment)


def _read_prompt(fixture_files, site: str, tag: str | None) -> dict:
    """A load of the file ("ref"), and beside it the load under test ("ld", tagged `tag`) unless `tag` is None."""
    report = 3 if site in CHECKPOINT_SITES else 1
    prompt = {"ref": _read_loader(fixture_files, site, "reference"), "out_ref": show(["ref", report])}
    if tag is not None:
        prompt.update({"ld": _read_loader(fixture_files, site, tag), "out": show(["ld", report])})
    return prompt


def _loaded_bits(runner, node: str, site: str) -> dict[str, torch.Tensor]:
    """The loaded model's tensors (and text encoders' weights) as raw bytes."""
    outputs = runner.node_outputs(node)
    bits = {f"model.{k}": v for k, v in exact_bits(outputs[0]).items()}
    if site in CHECKPOINT_SITES:
        bits.update({f"clip.{k}": w.detach().contiguous().view(torch.uint8).clone()
                     for k, w in clip_weights(outputs[1]).items()})
    return bits


def _fail_reading(monkeypatch, site: str, fault: str, after: int = 4) -> list[tuple[str, str]]:
    """Make a read fail mid-file, after `after` tensors under READ_PREFIX were read: the pack's reader maps each
    tensor's pages (mmap fails with EIO, or ENOMEM); ComfyUI reads with safetensors' get_tensor (which raises an
    OSError with a message, or a MemoryError). Returns the (file, tensor) reads so far."""
    reads: list[tuple[str, str]] = []
    if site in ("disabled", "diffusers"):
        import safetensors

        real_open = safetensors.safe_open
        error = OSError("Input/output error (os error 5)") if fault == "io" else MemoryError()

        class FailingFile:
            def __init__(self, filename, *args, **kwargs):
                self.name, self.file = os.path.basename(filename), real_open(filename, *args, **kwargs)

            def __enter__(self):
                self.file.__enter__()
                return self

            def __exit__(self, *exc):
                return self.file.__exit__(*exc)

            def __getattr__(self, attr):
                return getattr(self.file, attr)

            def get_tensor(self, key):
                reads.append((self.name, key))
                if len(reads) == after + 1:
                    raise error
                return self.file.get_tensor(key)

        monkeypatch.setattr(safetensors, "safe_open", FailingFile)
        return reads
    error = OSError(*((errno.EIO, "Input/output error") if fault == "io" else (errno.ENOMEM, "Cannot allocate memory")))
    return fail_tensor_map(monkeypatch, pack_module("quant.streaming")._TensorReader, after + 1, error,
                           READ_PREFIX.get(site, ""))


@pytest.mark.parametrize("fault", ["io", "memory"])
@pytest.mark.parametrize("site", READ_SITES)
def test_read_fault_names_the_file_and_the_fix_and_the_next_load_is_right(runner, fixture_files, monkeypatch, site,
                                                                          fault):
    """An I/O error or running out of memory mid-file: the error names the input, the file (the tensor where the
    pack reads it) and what to do; a cached load of the same file beside it is untouched, and the same load then
    gives what a load without the fault gives."""
    runner.run(_read_prompt(fixture_files, site, None))
    reference = runner.node_outputs("ref")[0]
    reference_bits = _loaded_bits(runner, "ref", site)
    attempt = f"{site} {fault}"
    reads = _fail_reading(monkeypatch, site, fault)
    text = error_of(runner, _read_prompt(fixture_files, site, attempt))
    monkeypatch.undo()
    file, tensor = reads[-1]  # the read that failed
    assert tensor.startswith(READ_PREFIX.get(site, "")), reads
    assert sum(key.startswith(READ_PREFIX.get(site, "")) for _, key in reads) == 5, f"not mid-file: {reads}"
    input_name = "ckpt_name" if site in CHECKPOINT_SITES else "model_name"
    where = f"{input_name}: {file}" if site in ("disabled", "diffusers") else f"{input_name}: {file} (tensor {tensor})"
    assert f"{where}: " in text, text
    if fault == "io":
        assert "reading it failed (Input/output error" in text and "reconnect the drive" in text, text
    else:
        assert "ran out of memory while loading it" in text and "Free memory" in text, text
        advice = {"checkpoint": "text_encoder_fp8=all", "text_encoders": "text_encoder_fp8=all",
                  "disabled": "an fp8_format loads it in about half the memory", "diffusion": "memory_budget smaller",
                  "diffusers": "A diffusers folder is read whole in 16-bit"}[site]
        assert advice in text, text

    runner.run(_read_prompt(fixture_files, site, attempt))  # the same load, without the fault
    assert runner.node_outputs("ref")[0] is reference, "the cached load was replaced"
    assert same_bytes(_loaded_bits(runner, "ref", site), reference_bits), "the cached load changed"
    assert same_bytes(_loaded_bits(runner, "ld", site), reference_bits), "the load after the fault differs"


# --------------------------------------------------------------------------- models this pack cannot quantize

def test_quantize_model_refuses_a_gguf_q8_0_model_naming_what_works(comfy_nodes, fixture_files):
    """ComfyUI-GGUF holds a Q8_0 model's Linear weights as packed uint8 codes (its GGMLTensor reports the logical
    shape): Quantize Model refuses them and names the files that work, not a loader that cannot read GGUF."""
    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(fixture_files["large_transformer"]))
    layer = "joint_blocks.0.x_block.attn.qkv"
    q8_0 = torch.nn.Linear(128, 384)
    q8_0.weight = torch.nn.Parameter(torch.randint(0, 255, (384, 128), dtype=torch.uint8), requires_grad=False)
    gguf = model.clone()
    gguf.add_object_patch(f"diffusion_model.{layer}", q8_0)
    with pytest.raises(ValueError) as caught:
        comfy_nodes["SD35FP8QuantizeModel"].execute(model=gguf, fp8_format="float8_e4m3fn", scaling="per_channel",
                                                    protect_preset="auto", compute="auto")
    text = str(caught.value)
    assert f"{layer}.weight is torch.uint8: packed quantized data" in text, text
    assert "load the model from an F16/BF16 GGUF or a 16-bit .safetensors file" in text and "own loader" not in text
