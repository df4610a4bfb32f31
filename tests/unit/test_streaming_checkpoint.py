"""Streaming quantize-at-load, the native file layout, legacy scaled_fp8, pickle refusal, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd35_fp8.quant import QuantConfig
from sd35_fp8.quant.checkpoint import (
    UnsafeFileError,
    check_safetensors,
    inspect_file,
    refuse_pickle,
    save_quantized,
)
from sd35_fp8.quant.formats import dequantize_weight
from sd35_fp8.quant.streaming import quantize_safetensors_stream, quantize_state_dict

PREFIX = "model.diffusion_model."


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8)
                                        if a[k].dtype.itemsize == 1 else a[k], b[k].view(torch.uint8)
                                        if b[k].dtype.itemsize == 1 else b[k]) for k in a)


@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
def test_streaming_equals_in_memory_bit_for_bit(fixture_files, scaling):
    path = fixture_files["medium_all_in_one"]
    config = QuantConfig(scaling=scaling, protect_patterns="joint_blocks.2.*")
    streamed, formats_s, report_s = quantize_safetensors_stream(path, config, model_prefix=PREFIX,
                                                                text_encoders="all")
    in_memory, formats_m, report_m = quantize_state_dict(load_file(str(path)), config, model_prefix=PREFIX,
                                                         text_encoders="all")
    assert _same(streamed, in_memory) and formats_s == formats_m
    assert report_s.to_dict() == report_m.to_dict()
    assert "joint_blocks.0.x_block.attn2.qkv" in formats_s and "joint_blocks.2.x_block.mlp.fc1" not in formats_s
    assert streamed[PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight"].dtype == torch.float8_e4m3fn
    assert streamed["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"].dtype == \
        torch.float8_e4m3fn
    assert streamed["text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight"].dtype == \
        torch.float16
    assert report_s.rule.startswith("auto: detected sd35_medium")


def test_streaming_through_a_device_reader_equals_the_plain_stream(fixture_files):
    """`device=` (the loaders pass the device ComfyUI builds the model on) routes the model's float tensors through
    `.to(device)`, budget re-reads and the table included; on the CPU that is the same tensor, so the results must
    be bit-identical (tests/gpu checks a CUDA device against this)."""
    path = fixture_files["medium_all_in_one"]
    config = QuantConfig(memory_budget=6_800_000)
    plain, formats_p, report_p = quantize_safetensors_stream(path, config, model_prefix=PREFIX, text_encoders="all")
    routed, formats_r, report_r = quantize_safetensors_stream(path, config, model_prefix=PREFIX, text_encoders="all",
                                                              device="cpu")
    assert _same(plain, routed) and formats_p == formats_r and report_p.to_dict() == report_r.to_dict()
    assert report_r.budget["kept_16bit"] or report_r.budget["demoted"]  # the budget re-read layers through the reader


def test_streaming_progress_and_text_encoder_default(fixture_files):
    calls = []
    sd, _, report = quantize_safetensors_stream(fixture_files["large_all_in_one"], QuantConfig(),
                                                model_prefix=PREFIX, text_encoders="t5xxl_only",
                                                progress=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] and len(calls) == calls[-1][1]
    assert sd["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"].dtype == torch.float16
    assert report.n_fp8 > 0


def test_save_load_round_trip_is_bit_exact(fixture_files, tmp_path):
    sd, formats, _ = quantize_safetensors_stream(fixture_files["large_transformer"], QuantConfig())
    path = save_quantized(tmp_path / "m.safetensors", sd, formats, metadata={"sd35_fp8.preset": "auto"})
    loaded, loaded_formats, report = quantize_safetensors_stream(path, QuantConfig())  # FP8 layers pass through
    assert _same(sd, loaded) and loaded_formats == formats and report.n_already_fp8 == len(formats)
    metadata = check_safetensors(path)["__metadata__"]
    assert metadata["sd35_fp8.preset"] == "auto"
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    # the dict form loads; the marking keeps ComfyUI 0.8.0 off FP8 x FP8 with unscaled activations
    assert layers["joint_blocks.0.x_block.attn.qkv"] == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    info = inspect_file(path)
    assert info["layout"] == "native" and info["fp8_layers"] == len(formats) == info["per_channel_layers"]


def test_save_is_atomic_and_never_overwrites(fixture_files, tmp_path, monkeypatch):
    sd, formats, _ = quantize_safetensors_stream(fixture_files["large_transformer"], QuantConfig())
    target = tmp_path / "m.safetensors"
    save_quantized(target, sd, formats)
    first = target.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_quantized(target, sd, formats)
    assert target.read_bytes() == first

    from sd35_fp8.quant import checkpoint as checkpoint

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(tmp_path / "other.safetensors", sd, formats)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no partial file, no temp file


def test_legacy_scaled_fp8_file_loads_and_streams(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(32, 16) * 0.05
    scale = w.abs().max() / 448
    legacy = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
              "joint_blocks.0.x_block.attn.qkv.weight": (w / scale).to(torch.float8_e4m3fn),
              "joint_blocks.0.x_block.attn.qkv.scale_weight": scale.reshape(()),
              "joint_blocks.0.x_block.attn.qkv.scale_input": torch.tensor(1.0),
              "joint_blocks.0.x_block.attn.qkv.bias": torch.zeros(32).to(torch.float8_e4m3fn),
              "context_embedder.weight": torch.randn(16, 16).half()}
    path = tmp_path / "legacy.safetensors"
    save_file(legacy, str(path))
    assert inspect_file(path)["layout"] == "scaled_fp8 (legacy)"
    config = QuantConfig(protect_preset="none", protect_patterns="context_embedder")
    sd, formats, report = quantize_safetensors_stream(path, config)
    assert formats == {"joint_blocks.0.x_block.attn.qkv": "float8_e4m3fn"}
    assert "scaled_fp8" not in sd and not any(k.endswith(("scale_weight", "scale_input")) for k in sd)
    real = dequantize_weight(sd["joint_blocks.0.x_block.attn.qkv.weight"],
                             sd["joint_blocks.0.x_block.attn.qkv.weight_scale"])
    assert float((real - w).norm() / w.norm()) < 0.04
    assert sd["joint_blocks.0.x_block.attn.qkv.bias"].dtype == torch.float16  # an unscaled fp8 bias, widened
    assert "already holds 1 FP8 layer(s)" in " ".join(report.warnings)
    streamed = sd
    assert torch.equal(streamed["joint_blocks.0.x_block.attn.qkv.weight_scale"], scale.reshape(()).float())


def test_pickle_files_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("model.ckpt", "model.pt", "model.bin", "disguised.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"state_dict": Exploit()}))
        with pytest.raises(UnsafeFileError, match="never unpickles"):
            refuse_pickle(path, "ckpt_name")
        with pytest.raises(UnsafeFileError):
            quantize_safetensors_stream(path, QuantConfig())
    torch.save({"w": torch.zeros(2)}, tmp_path / "zip.safetensors")
    with pytest.raises(UnsafeFileError, match="torch.save"):
        refuse_pickle(tmp_path / "zip.safetensors")
    assert not marker.exists()


def test_mapped_reads_never_write_the_file_and_kept_tensors_own_their_memory(fixture_files, tmp_path):
    """Tensors are quantized from private maps of the file: what the model keeps as it was read (norms, biases,
    protected layers) is copied out, so changing it in place changes neither the file nor a second load."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(fixture_files["medium_transformer"].read_bytes())
    before = path.read_bytes()
    config = QuantConfig(protect_patterns="joint_blocks.1.*")
    first, _, report = quantize_safetensors_stream(path, config)
    kept = [k for k, v in first.items() if v.dtype == torch.float16]
    assert "joint_blocks.1.x_block.mlp.fc1.weight" in kept and report.n_protected > 0
    with open("/proc/self/maps") as maps:  # the address ranges still mapped from the file (none should hold a tensor)
        ranges = [[int(a, 16) for a in line.split()[0].split("-")] for line in maps if str(path) in line]
    assert not [k for k in first if any(lo <= first[k].data_ptr() < hi for lo, hi in ranges)]
    for tensor in first.values():
        tensor.reshape(-1).view(torch.uint8).bitwise_not_()
    assert path.read_bytes() == before
    second, _, _ = quantize_safetensors_stream(path, config)
    assert all(torch.equal(second[k], load_file(str(path))[k]) for k in kept)


def test_a_file_cut_after_its_header_was_checked_is_refused(fixture_files, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(fixture_files["medium_transformer"].read_bytes())
    header = check_safetensors(path, "model_name")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(ValueError, match="cut.safetensors is truncated .*re-download it"):
        quantize_safetensors_stream(path, QuantConfig(), header=header)


def test_truncated_and_corrupt_files_name_the_input(fixture_files, tmp_path):
    data = fixture_files["large_transformer"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model_name: cut.safetensors is truncated.*re-download"):
        check_safetensors(tmp_path / "cut.safetensors", "model_name")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="empty or truncated"):
        check_safetensors(tmp_path / "empty.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"0" * 64)
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        check_safetensors(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        check_safetensors(tmp_path / "missing.safetensors")


def test_already_fp8_file_is_passed_through(fixture_files, tmp_path):
    sd, formats, _ = quantize_safetensors_stream(fixture_files["large_transformer"], QuantConfig())
    path = save_quantized(tmp_path / "fp8.safetensors", sd, formats)
    again, again_formats, report = quantize_safetensors_stream(path, QuantConfig())
    assert _same(sd, again) and again_formats == formats and report.n_fp8 == 0
    assert any("already" in w for w in report.warnings)
    with safe_open(str(path), "pt") as f:
        assert "_quantization_metadata" in f.metadata()


def _packed_file(source, tmp_path, how: str):
    """A diffusion model whose first qkv layer is in a packed format ComfyUI 0.8.0 knows and we do not."""
    sd = load_file(str(source))
    layer = "joint_blocks.0.x_block.attn.qkv"
    out_f, in_f = sd[f"{layer}.weight"].shape
    sd[f"{layer}.weight"] = torch.randint(0, 255, (out_f, in_f // 2), dtype=torch.uint8)  # two fp4 codes a byte
    sd[f"{layer}.weight_scale"] = torch.ones(out_f, in_f // 16).to(torch.float8_e4m3fn)
    sd[f"{layer}.weight_scale_2"] = torch.tensor(1.0)
    metadata = {}
    if how == "header":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0",
                                                         "layers": {layer: {"format": "nvfp4"}}})
    elif how == "comfy_quant":  # as ComfyUI 0.8.0's ModelSave writes it
        sd[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "mxfp8"}).encode()), dtype=torch.uint8)
    path = tmp_path / f"packed_{how}.safetensors"
    save_file(sd, str(path), metadata=metadata)
    return path, layer, {"header": "nvfp4", "comfy_quant": "mxfp8", "undeclared": "torch.uint8"}[how]


@pytest.mark.parametrize("how", ["header", "comfy_quant", "undeclared"])
def test_packed_quantized_layers_are_refused_naming_layer_and_format(tmp_path, fixture_files, how):
    from sd35_fp8.quant.streaming import UnsupportedQuantFormat

    path, layer, fmt = _packed_file(fixture_files["large_transformer"], tmp_path, how)
    named = re.escape(repr(fmt) if how != "undeclared" else fmt)
    with pytest.raises(UnsupportedQuantFormat, match=rf"{layer}.* {named}") as caught:
        quantize_safetensors_stream(path, QuantConfig())
    if how == "undeclared":  # what works instead: a 16-bit file (the loaders read .safetensors only)
        assert "Instead, quantize a 16-bit .safetensors file of the model" in str(caught.value)
        assert "own loader" not in str(caught.value)
    sd = load_file(str(path))
    with pytest.raises(UnsupportedQuantFormat, match=layer):
        quantize_state_dict(sd, QuantConfig())


def test_declared_fp8_layers_and_their_entries_load(tmp_path, fixture_files):
    """A 0.8.0-saved file: float8 layers with `.comfy_quant` entries load; the entries are not passed on."""
    sd = load_file(str(fixture_files["large_transformer"]))
    layer = "joint_blocks.0.x_block.attn.qkv"
    weight = sd[f"{layer}.weight"].float()
    scale = weight.abs().max() / 448
    sd[f"{layer}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
    sd[f"{layer}.weight_scale"] = scale.reshape(())
    sd[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn",
                                                               "full_precision_matrix_mult": True}).encode()),
                                              dtype=torch.uint8)
    path = tmp_path / "comfy_saved.safetensors"
    save_file(sd, str(path))
    out, formats, report = quantize_safetensors_stream(path, QuantConfig())
    assert formats[layer] == "float8_e4m3fn" and torch.equal(out[f"{layer}.weight_scale"], scale.reshape(()))
    assert not [k for k in out if k.endswith(".comfy_quant")] and report.n_already_fp8 == 1


def test_stock_layout_rewrites_what_stock_comfyui_cannot_run_and_keeps_the_rest():
    """Per-channel and e5m2 layers become per-tensor e4m3 (no host ever computes e5m2 x e5m2 from our files);
    layers already per-tensor e4m3 keep their bits; every written layer is marked full-precision matmul."""
    from sd35_fp8.quant.checkpoint import quantization_metadata, to_stock_layout
    from sd35_fp8.quant.formats import quantize_weight

    torch.manual_seed(0)
    real = {name: torch.randn(32, 16) * 0.1 for name in ("native", "per_channel", "e5m2")}
    sd, formats = {}, {}
    for name, fmt, scaling in (("native", "float8_e4m3fn", "per_tensor"), ("per_channel", "float8_e4m3fn",
                               "per_channel"), ("e5m2", "float8_e5m2", "per_tensor")):
        sd[f"{name}.weight"], sd[f"{name}.weight_scale"] = quantize_weight(real[name], fmt, scaling)
        formats[name] = fmt
    native_bits = sd["native.weight"].clone()
    held = {name: dequantize_weight(sd[f"{name}.weight"], sd[f"{name}.weight_scale"]) for name in real}
    assert to_stock_layout(sd, formats) == 2
    assert formats == dict.fromkeys(real, "float8_e4m3fn")
    for name in real:
        assert sd[f"{name}.weight"].dtype == torch.float8_e4m3fn and sd[f"{name}.weight_scale"].numel() == 1
        rewritten = dequantize_weight(sd[f"{name}.weight"], sd[f"{name}.weight_scale"])
        assert float((rewritten - held[name]).norm() / held[name].norm()) < 0.04, name  # one e4m3 rounding at most
    assert torch.equal(sd["native.weight"].view(torch.uint8), native_bits.view(torch.uint8))
    layers = json.loads(quantization_metadata(formats))["layers"]
    assert all(v == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True} for v in layers.values())
