"""T5-XXL in FP8 on T5's real structure (the fixture's T5: real width, vocabulary, key names, 24 blocks, gated-GELU
feed-forward and relative attention bias; fewer heads and a narrower feed-forward, tiny_sd35.TINY_T5XXL)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import FP8, clip_weights, same_bits, write_legacy_scaled_fp8
from prompts import decode_and_preview, dm_loader, fp8_loader, ksampler, show

from tools import comfy_host

T5_LAYER = r"encoder\.block\.\d+\.layer\.(0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(wi_0|wi_1|wo))"  # its Linears
T5_LINEAR = re.compile(rf"t5xxl\.transformer\.{T5_LAYER}$")
CLIP_L_LINEAR = re.compile(r"clip_l\.transformer\.text_model\.encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d)$")
T5_BLOCKS = 24
TOKENS = 77  # CLIP-L's context comes first in SD3's conditioning, T5's after it


def _encode(clip: list, tag: str, text: str = "a red fox in the snow, photograph") -> dict:
    """CLIPTextEncode "e<tag>" and a PreviewAny of it (an output node, so it runs)."""
    return {f"e{tag}": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}},
            f"s{tag}": show([f"e{tag}", 0])}


def _sample(model: list, positive: str) -> dict:
    """KSampler (positive and negative: the encode "e<positive>") and a decoded preview: sampling runs."""
    ks = ksampler(model)
    ks["inputs"] |= {"positive": [f"e{positive}", 0], "negative": [f"e{positive}", 0]}
    return {"ks": ks, "lat": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64,
                                                                          "batch_size": 1}}}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _check_layers(weights: dict[str, torch.Tensor], clip_l_fp8: bool) -> None:
    """T5's attention and feed-forward projections in FP8, everything else of T5 16-bit; CLIP-L as chosen."""
    t5 = {n: w for n, w in weights.items() if n.startswith("t5xxl.")}
    fp8 = {n for n, w in t5.items() if w.dtype in FP8}
    assert fp8 == {n for n in t5 if T5_LINEAR.search(n)} and len(fp8) == 7 * T5_BLOCKS
    sixteen = {n: w.dtype for n, w in t5.items() if n not in fp8}
    assert "t5xxl.transformer.shared" in sixteen and "t5xxl.transformer.encoder.final_layer_norm" in sixteen
    assert "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias" in sixteen
    assert sum(n.endswith("layer_norm") for n in sixteen) == 2 * T5_BLOCKS + 1
    assert all(d in (torch.float16, torch.bfloat16, torch.float32) for d in sixteen.values()), sixteen
    clip_l = {n: w.dtype in FP8 for n, w in weights.items() if n.startswith("clip_l.")}
    assert {n for n, is_fp8 in clip_l.items() if is_fp8} == ({n for n in clip_l if CLIP_L_LINEAR.search(n)}
                                                              if clip_l_fp8 else set())
    assert not any(is_fp8 for n, is_fp8 in clip_l.items() if "embedding" in n or "text_projection" in n)


def _conditioning_close(runner, tag16: str, tag8: str, t5_fp8: bool, clip_l_fp8: bool) -> None:
    c16, c8 = runner.node_outputs(f"e{tag16}")[0][0][0], runner.node_outputs(f"e{tag8}")[0][0][0]
    assert c16.shape == c8.shape and c16.shape[1] > TOKENS  # CLIP-L's 77 tokens, then T5's
    clip_rel, t5_rel = _rel(c8[:, :TOKENS], c16[:, :TOKENS]), _rel(c8[:, TOKENS:], c16[:, TOKENS:])
    # measured: each FP8 T5 layer's weight error is ~2.4% (the report); through 24 random-weight blocks T5's output
    # moves 0.088. A plain float8 cast of the same weights (no scale: many of them in float8's subnormals) gives 0.13
    assert (0 < t5_rel < 0.12) if t5_fp8 else t5_rel == 0, t5_rel
    assert (0 < clip_rel < 0.12) if clip_l_fp8 else clip_rel == 0, clip_rel


@pytest.mark.parametrize("option", ["t5xxl_only", "none", "all"])
def test_checkpoint_loader_text_encoder_fp8_options_on_t5xxl(runner, fixture_files, option):
    ckpt = fixture_files["large_t5xxl_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
              "ld": fp8_loader(ckpt, text_encoder_fp8=option), **_encode(["ck", 1], "16"), **_encode(["ld", 1], "8")}
    if option == "t5xxl_only":  # the default
        prompt |= _sample(["ld", 0], "8") | decode_and_preview(["ks", 0], ["ld", 2], "img")
    runner.run(prompt)
    clip, report = runner.node_outputs("ld")[1], runner.node_outputs("ld")[3]
    weights = clip_weights(clip)
    if option == "none":
        assert not any(w.dtype in FP8 for w in weights.values())
    else:
        _check_layers(weights, clip_l_fp8=option == "all")
        assert "text_encoders.t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wo | 4096x32 | " in report
        assert "text_encoders.t5xxl.transformer.shared | 32128x4096 | float16 -> float16 |" in report
    assert ("text_encoders.t5xxl." in report) == (option != "none")
    _conditioning_close(runner, "16", "8", t5_fp8=option != "none", clip_l_fp8=option == "all")
    if option == "t5xxl_only":
        assert torch.isfinite(runner.node_outputs("dec_img")[0]).all()


@pytest.mark.parametrize("encoders", ["t5xxl", "t5xxl_and_clip_g", "all"])
def test_quantize_clip_encoders_options_on_t5xxl(runner, fixture_files, encoders):
    ckpt = fixture_files["large_t5xxl_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
              **_encode(["ck", 1], "16")}
    runner.run(prompt)
    clip16 = runner.node_outputs("ck")[1]
    before = {k: v.clone() for k, v in clip16.cond_stage_model.state_dict().items()}
    prompt |= {"qc": _quantize_clip(["ck", 1], encoders), **_encode(["qc", 0], "8")}
    runner.run(prompt)
    clip8, report = runner.node_outputs("qc")
    _check_layers(clip_weights(clip8), clip_l_fp8=encoders == "all")
    assert ("no clip_g" in report) == (encoders != "t5xxl") and "no t5xxl" not in report
    assert re.search(r"t5xxl\.transformer\.encoder\.block\.0\.layer\.0\.SelfAttention\.q \| 32x4096 \| float16 -> "
                     r"float8_e4m3fn \| .* \| fp8", report)
    _conditioning_close(runner, "16", "8", t5_fp8=True, clip_l_fp8=encoders == "all")
    # the input CLIP is never changed: same tensors, and the same conditioning when encoded again after the copy ran
    assert clip_weights(clip16)["t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"].dtype == torch.float16
    assert same_bits(before, clip16.cond_stage_model.state_dict())
    if encoders == "t5xxl":
        runner.run(prompt | {"again": prompt["e16"], "s": show(["again", 0])})
        assert torch.equal(runner.node_outputs("again")[0][0][0], runner.node_outputs("e16")[0][0][0])


def _quantize_clip(clip: list, encoders: str = "t5xxl") -> dict:
    return {"class_type": "SD35FP8QuantizeCLIP",
            "inputs": {"clip": clip, "encoders": encoders, "fp8_format": "float8_e4m3fn", "scaling": "per_channel"}}


def _clip_loader(name: str, node: str = "cl") -> dict:
    return {node: {"class_type": "CLIPLoader", "inputs": {"clip_name": name, "type": "sd3"}}}


def test_separate_t5xxl_file_quantizes_and_samples(runner, fixture_files):
    """A T5-XXL loaded from text_encoders/ (ComfyUI's CLIP loaders detect it by its 24th block), all encoders
    asked for: the ones this CLIP lacks are named."""
    prompt = {**_clip_loader(fixture_files["t5xxl_text_encoder"].name), "qc": _quantize_clip(["cl", 0], "all"),
              **_encode(["cl", 0], "16"), **_encode(["qc", 0], "8"),
              "ld": dm_loader(fixture_files["large_transformer"].name), **_sample(["ld", 0], "8"),
              "out": show(["ks", 0])}
    runner.run(prompt)
    clip8, report = runner.node_outputs("qc")
    _check_layers(clip_weights(clip8), clip_l_fp8=False)
    assert "rule: text encoders: t5xxl in FP8" in report and "no clip_l" in report and "no clip_g" in report
    c16, c8 = runner.node_outputs("e16")[0][0][0], runner.node_outputs("e8")[0][0][0]
    assert c16.shape[-1] == 4096 and 0 < _rel(c8, c16) < 0.12  # T5 alone: its output is the whole conditioning
    assert torch.isfinite(runner.node_outputs("ks")[0]["samples"]).all()


def test_scaled_fp8_t5xxl_passes_through_as_fp8(runner, comfy_base, fixture_files, tmp_path):
    """ComfyUI's t5xxl_fp8_e4m3fn_scaled layout: `scaled_fp8` marker, float8 Linear weights with a float32
    `scale_weight`; embeddings, norms and the relative attention bias 16-bit."""
    path = tmp_path / "tiny_t5xxl_fp8_e4m3fn_scaled.safetensors"
    legacy = write_legacy_scaled_fp8(fixture_files["t5xxl_text_encoder"], path, layers=T5_LAYER)
    assert sum(k.endswith(".scale_weight") for k in legacy) == 7 * T5_BLOCKS
    name = comfy_host.link_model(comfy_base, "text_encoders", path)
    import folder_paths

    folder_paths.filename_list_cache.clear()
    prompt = {**_clip_loader(name, "sc"), **_clip_loader(fixture_files["t5xxl_text_encoder"].name),
              "qc": _quantize_clip(["sc", 0]),
              **_encode(["cl", 0], "16"), **_encode(["sc", 0], "s"), **_encode(["qc", 0], "8"),
              "show": show(["qc", 1])}
    runner.run(prompt)
    clip8, report = runner.node_outputs("qc")
    assert f"0 fp8, {7 * T5_BLOCKS} already fp8" in report and "kept as they are" in report
    assert "t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wo | 4096x32 | float8_e4m3fn -> " \
           "float8_e4m3fn" in report
    assert not [k for k in clip8.patcher.object_patches if T5_LINEAR.search(k)]  # nothing re-quantized
    c16, cs, c8 = (runner.node_outputs(f"e{t}")[0][0][0] for t in ("16", "s", "8"))
    assert torch.equal(cs, c8)  # passed through: the very layers ComfyUI loaded
    assert 0 < _rel(cs, c16) < 0.1  # per-tensor scales: coarser than ours, still close


def test_checkpoint_with_scaled_fp8_t5xxl_loads_as_stock_does(runner, comfy_base, fixture_files, tmp_path):
    """An all-in-one whose T5 is in the scaled_fp8 layout: our loader keeps its FP8 layers with their scales,
    whether text_encoder_fp8 chooses T5 or not, reports them as FP8 and encodes as ComfyUI's own loader does."""
    path = tmp_path / "tiny_sd35_large_t5xxl_fp8_scaled.safetensors"
    write_legacy_scaled_fp8(fixture_files["large_t5xxl_all_in_one"], path, "text_encoders.t5xxl.transformer.",
                            layers=T5_LAYER)
    name = comfy_host.link_model(comfy_base, "checkpoints", path)
    import folder_paths

    folder_paths.filename_list_cache.clear()
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}, **_encode(["ck", 1], "16")}
    for option in ("t5xxl_only", "none"):
        prompt |= {f"ld_{option}": fp8_loader(name, text_encoder_fp8=option), **_encode([f"ld_{option}", 1], option)}
    runner.run(prompt)
    c_stock = runner.node_outputs("e16")[0][0][0]
    for option in ("t5xxl_only", "none"):
        report = runner.node_outputs(f"ld_{option}")[3]
        assert f"{7 * T5_BLOCKS} already fp8" in report, option
        assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q | 32x4096 | float8_e4m3fn" \
            in report
        assert _rel(runner.node_outputs(f"e{option}")[0][0][0][:, TOKENS:], c_stock[:, TOKENS:]) < 1e-2, option


T5_LORA_LAYERS = ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.o",
                  "encoder.block.1.layer.1.DenseReluDense.wi_0", "encoder.block.1.layer.1.DenseReluDense.wo")


def test_t5xxl_lora_and_hook_lora_run_at_run_time_on_its_fp8_layers(runner, write_lora, fixture_files):
    """A LoRA on T5's FP8 layers, loaded (LoraLoader) or as a hook (Create Hook LoRA -> Set CLIP Hooks), is applied
    at run time like the diffusion model's (nodes/runtime_patches.py): both give the same conditioning, FP8 T5's error
    against FP16 T5 + the same LoRA is no larger than its error without the LoRA, and the FP8 weights never change."""
    ckpt = fixture_files["large_t5xxl_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, "ld": fp8_loader(ckpt)}
    runner.run(prompt | _encode(["ck", 1], "16") | {"o": show(["ld", 3])})
    weights = clip_weights(runner.node_outputs("ck")[1])
    # OneTrainer's SD3 keys (lora_te3_: T5 after CLIP-L and CLIP-G)
    lora = write_lora("tiny_t5xxl_lora.safetensors", 5, {"lora_te3_" + layer.replace(".", "_"):
                                                         tuple(weights[f"t5xxl.transformer.{layer}"].shape)
                                                         for layer in T5_LORA_LAYERS})
    fp8_clip = runner.node_outputs("ld")[1]
    before = {n: w.detach().clone() for n, w in clip_weights(fp8_clip).items()}
    prompt["hk"] = {"class_type": "CreateHookLora", "inputs": {"lora_name": lora, "strength_model": 0.0,
                                                               "strength_clip": 1.0}}
    for tag, source in (("16", "ck"), ("8", "ld")):
        prompt[f"l{tag}"] = {"class_type": "LoraLoader", "inputs": {"model": [source, 0], "clip": [source, 1],
                                                                     "lora_name": lora, "strength_model": 0.0,
                                                                     "strength_clip": 1.0}}
        prompt[f"h{tag}"] = {"class_type": "SetClipHooks", "inputs": {"clip": [source, 1], "apply_to_conds": False,
                                                                      "schedule_clip": False, "hooks": ["hk", 0]}}
        prompt |= _encode([source, 1], tag) | _encode([f"l{tag}", 1], f"{tag}l") | _encode([f"h{tag}", 0], f"{tag}h")
    runner.run(prompt)

    def t5(tag: str) -> torch.Tensor:
        return runner.node_outputs(f"e{tag}")[0][0][0][:, TOKENS:]

    effect = _rel(t5("16"), t5("16l"))
    assert effect >= 0.30, f"the LoRA moves T5's output by {effect:.3f} only: it would prove nothing"
    assert _rel(t5("16h"), t5("16l")) < 1e-4  # the hook is the same LoRA: one reference for both
    plain, loaded, hooked = _rel(t5("8"), t5("16")), _rel(t5("8l"), t5("16l")), _rel(t5("8h"), t5("16l"))
    absolute = float((t5("8l") - t5("16l")).norm() / (t5("8") - t5("16")).norm())
    print(f"{comfy_host.host_label()} T5 LoRA: effect {effect:.4f}, FP8 alone {plain:.4f}, FP8 + LoRA {loaded:.4f}, "
          f"FP8 + hook LoRA {hooked:.4f}; FP8's error with/without the LoRA {absolute:.3f}")
    # measured: the LoRA moves T5's output by 140%; FP8 + LoRA is off by 0.0662, loaded or as a hook, and its error
    # is 0.75x FP8's own (the exact LoRA adds none). Written into the FP8 weights (ComfyUI's hook route, up to
    # commit 16f0058) the hook was off by 1.3158
    assert _rel(t5("8h"), t5("8l")) < 1e-5, "a hook LoRA does not take the loaded LoRA's route"
    assert absolute <= 1.0, absolute
    assert same_bits(before, clip_weights(fp8_clip))
