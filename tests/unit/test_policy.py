"""Protection policy: variant detection, presets, user patterns and their errors/warnings."""

from __future__ import annotations

import pytest

from sd35_fp8.quant.checkpoint import check_safetensors
from sd35_fp8.quant.config import QuantConfig
from sd35_fp8.quant.policy import detect_variant, linear_names, parse_patterns, resolve_policy

PREFIX = "model.diffusion_model."


def shapes_of(path, prefix: str = "") -> dict[str, tuple[int, ...]]:
    header = check_safetensors(path)
    return {k[len(prefix):]: tuple(v["shape"]) for k, v in header.items()
            if k != "__metadata__" and k.startswith(prefix)}


@pytest.fixture(scope="module")
def large(fixture_files):
    return shapes_of(fixture_files["large_transformer"])


@pytest.fixture(scope="module")
def medium(fixture_files):
    return shapes_of(fixture_files["medium_all_in_one"], PREFIX)


def test_detects_tiny_fixtures(large, medium):
    v = detect_variant(large)
    assert (v.name, v.depth, v.hidden, v.qk_norm, v.attn2_blocks) == ("sd35_large", 2, 128, True, ())
    v = detect_variant(medium)
    assert (v.name, v.depth, v.qk_norm, v.attn2_blocks) == ("sd35_medium", 3, True, (0, 1))
    assert detect_variant(large, hint="sd3.5_large_turbo.safetensors").name == "sd35_large_turbo"
    assert detect_variant({"input_blocks.0.0.weight": (320, 4, 3, 3)}).name is None


def test_default_preset_keeps_embedders_and_final_layer(large):
    policy = resolve_policy(QuantConfig(), large)
    assert policy.rule.startswith("auto: detected sd35_large")
    assert {"context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
            "final_layer.linear", "final_layer.adaLN_modulation.1"} <= policy.protected
    quantized = [n for n in linear_names(large) if policy.why_protected(n) is None]
    assert "joint_blocks.0.x_block.attn.qkv" in quantized and "joint_blocks.1.x_block.mlp.fc2" in quantized
    assert all(n.startswith("joint_blocks.") for n in quantized)
    assert "pos_embed" not in linear_names(large)  # 3-D: never a Linear candidate


def test_none_quantizes_every_linear(large):
    policy = resolve_policy(QuantConfig(protect_preset="none"), large)
    assert linear_names(large) and all(policy.why_protected(n) is None for n in linear_names(large))


def test_user_patterns_glob_and_regex(large):
    config = QuantConfig(protect_patterns="# keep the first block\nre:^joint_blocks\\.0\\.\n\n*.mlp.fc2")
    policy = resolve_policy(config, large)
    assert "joint_blocks.0.context_block.attn.qkv" in policy.protected
    assert "joint_blocks.1.x_block.mlp.fc2" in policy.protected
    assert "joint_blocks.1.x_block.mlp.fc1" not in policy.protected
    assert "2 user pattern(s)" in policy.rule and not policy.warnings


def test_pattern_matching_nothing_is_a_warning(large):
    policy = resolve_policy(QuantConfig(protect_patterns="joint_blocks.99.*"), large)
    assert policy.warnings == ["protect_patterns line 1: 'joint_blocks.99.*' matches no layer"]


@pytest.mark.parametrize(("text", "message"), [
    ("re:joint_blocks.(", r"protect_patterns line 1: 're:joint_blocks\.\(' is not a valid regex"),
    ("ok.*\nre:", r"protect_patterns line 2: 're:' is an empty regex"),
    ("final layer", "contains whitespace"),
    ("joint_blocks.[0", "unbalanced"),
])
def test_invalid_patterns_name_line_and_pattern(text, message):
    with pytest.raises(ValueError, match=message):
        parse_patterns(text)


def test_sd35_preset_on_other_architecture_is_an_error_auto_is_generic():
    sdxl = {"input_blocks.1.1.proj_in.weight": (320, 320), "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
            (320, 320), "time_embed.0.weight": (1280, 320), "out.2.weight": (4, 320, 3, 3),
            "middle_block.1.transformer_blocks.0.ff.net.2.weight": (1280, 5120)}
    with pytest.raises(ValueError, match="protect_preset: sd35_large is for SD3.5"):
        resolve_policy(QuantConfig(protect_preset="sd35_large"), sdxl)
    policy = resolve_policy(QuantConfig(), sdxl)
    assert policy.rule.startswith("auto: generic rule")
    assert {"time_embed.0", "input_blocks.1.1.proj_in", "middle_block.1.transformer_blocks.0.ff.net.2"} \
        == set(policy.protected)
    assert policy.why_protected("input_blocks.1.1.transformer_blocks.0.attn1.to_q") is None


def test_mismatched_explicit_preset_warns(medium):
    policy = resolve_policy(QuantConfig(protect_preset="sd35_large"), medium)
    assert any("look like sd35_medium" in w for w in policy.warnings)
