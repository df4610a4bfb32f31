"""quantize(module): native FP8Linear swap vs optimum-quanto, same policy, input untouched."""

from __future__ import annotations

import json

import pytest
import torch
from mini_mmdit import MiniMMDiT

from sd35_fp8.quant import QuantConfig, quantize
from sd35_fp8.quant.decision import FP8, KEPT, PROTECTED, UNIT_SCALE
from sd35_fp8.quant.linear import FP8Linear


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_native_swaps_selected_linears_and_leaves_input_alone():
    model = MiniMMDiT()
    before = _state(model)
    q, report = quantize(model, QuantConfig())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    fp8 = {n for n, m in q.named_modules() if isinstance(m, FP8Linear)}
    assert "joint_blocks.0.x_block.attn.qkv" in fp8 and "context_embedder" not in fp8
    assert "final_layer.linear" not in fp8
    assert report.n_fp8 == len(fp8) + 1 == 2 * 2 * 5 + 1 and report.n_protected == 2  # + pos_embed, scale 1
    assert q.pos_embed.dtype == torch.float8_e4m3fn and model.pos_embed.dtype == torch.float32
    assert report.rule.startswith("auto: detected sd35_large")
    assert report.bytes_after < 0.35 * report.bytes_before  # fp32 in, fp8 out: ~1/4 plus protected layers
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        ref, out = model(x), q(x)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel


def test_inplace_changes_the_module_itself():
    model = MiniMMDiT()
    q, _ = quantize(model, QuantConfig(), inplace=True)
    assert q is model and isinstance(model.joint_blocks[0].x_block.mlp.fc1, FP8Linear)


def test_report_totals_and_text():
    _, report = quantize(MiniMMDiT(), QuantConfig(scaling="per_tensor", fp8_format="float8_e5m2"))
    text = report.to_text()
    assert f"bytes: {report.bytes_before} -> {report.bytes_after}" in text
    assert "float8_e5m2 per_tensor" in text and "joint_blocks.1.x_block.mlp.fc2 | 64x256 | float32 -> " \
        "float8_e5m2" in text
    data = report.to_dict()
    assert data["n_fp8"] == report.n_fp8 and len(data["layers"]) == len(report.layers)
    assert sum(layer["bytes_before"] for layer in data["layers"]) == data["bytes_before"]
    as_json = json.loads(json.dumps(data))  # what a script writes from it: plain JSON (shapes become lists)
    assert as_json["layers"][0]["shape"] == list(data["layers"][0]["shape"]) and as_json["ratio"] == data["ratio"]
    assert {layer["action"] for layer in as_json["layers"]} == {FP8, PROTECTED, UNIT_SCALE, KEPT}  # the plan's words


def test_quanto_backend_same_layers_and_close_outputs():
    pytest.importorskip("optimum.quanto")
    model = MiniMMDiT()
    native, native_report = quantize(model, QuantConfig())
    quanto, quanto_report = quantize(model, QuantConfig(backend="quanto"))
    assert quanto_report.backend == "quanto"
    assert [(layer.name, layer.action) for layer in sorted(native_report.layers, key=lambda la: la.name)] == \
        [(layer.name, layer.action) for layer in sorted(quanto_report.layers, key=lambda la: la.name)]
    from optimum.quanto import QLinear

    assert {n for n, m in quanto.named_modules() if isinstance(m, QLinear)} == \
        {n for n, m in native.named_modules() if isinstance(m, FP8Linear)}
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        ref = model(x)
        rel_native = float((native(x) - ref).norm() / ref.norm())
        rel_quanto = float((quanto(x) - ref).norm() / ref.norm())
    assert rel_quanto < 0.05 and abs(rel_native - rel_quanto) < 0.5 * rel_quanto, (rel_native, rel_quanto)
    quanto_errors = {layer.name: layer.rel_error for layer in quanto_report.layers if layer.action == FP8}
    native_errors = {layer.name: layer.rel_error for layer in native_report.layers if layer.action == FP8}
    assert quanto_errors.keys() == native_errors.keys()
    for name, err in native_errors.items():  # both per-channel absmax e4m3: the same error per layer
        assert quanto_errors[name] == pytest.approx(err, rel=0.2), name


def test_quanto_backend_refuses_per_tensor():
    pytest.importorskip("optimum.quanto")
    with pytest.raises(ValueError, match="scaling"):
        quantize(MiniMMDiT(), QuantConfig(backend="quanto", scaling="per_tensor"))


def _module(**children: torch.nn.Module) -> torch.nn.Module:
    module = torch.nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


def test_text_encoder_policy_on_a_t5_shaped_module():
    """`text_encoders`: a T5's matmuls go FP8 (no SD3 preset is applied); its token table, relative attention
    bias and layer norm stay as they are."""
    attention = _module(q=torch.nn.Linear(64, 64, bias=False), relative_attention_bias=torch.nn.Embedding(32, 2))
    feed_forward = _module(DenseReluDense=_module(wo=torch.nn.Linear(64, 64, bias=False)))
    block = _module(layer=torch.nn.ModuleList([_module(SelfAttention=attention), feed_forward]))
    t5 = _module(shared=torch.nn.Embedding(100, 64),
                 encoder=_module(block=torch.nn.ModuleList([block]), final_layer_norm=torch.nn.LayerNorm(64)))
    q, report = quantize(t5, QuantConfig(), text_encoders={"t5xxl": ""})
    assert {n for n, m in q.named_modules() if isinstance(m, FP8Linear)} == \
        {"encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.1.DenseReluDense.wo"}
    assert report.n_fp8 == 2 and "auto" not in report.rule
    bias = q.get_submodule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias")
    assert all(m.weight.dtype == torch.float32 for m in (q.shared, q.encoder.final_layer_norm, bias))
