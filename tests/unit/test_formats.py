"""FP8 quantize/dequantize numerics: scales, error ordering, exact values, zeros, NaN/Inf refusal."""

from __future__ import annotations

import pytest
import torch

from sd35_fp8.quant.formats import (
    dequantize_weight,
    fp8_dtype,
    fp8_max,
    quantize_unit_scale,
    quantize_weight,
    quantize_weight_with_error,
    relative_error,
)
from tools.tiny_sd35 import sincos_pos_embed

FORMATS = ["float8_e4m3fn", "float8_e5m2"]


def gaussian(out_f: int = 256, in_f: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02


def heavy_tailed(out_f: int = 256, in_f: int = 512, seed: int = 0) -> torch.Tensor:
    """Student-t (3 dof) rows, with a few outlier channels 30x larger: what real transformer weights look like."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(out_f, in_f, generator=gen)
    chi2 = torch.randn(3, out_f, in_f, generator=gen).pow(2).sum(0)
    w = normal / (chi2 / 3).sqrt() * 0.02
    w[torch.randperm(out_f, generator=gen)[:4]] *= 30
    return w


def error(w: torch.Tensor, fmt: str, scaling: str) -> float:
    q, s = quantize_weight(w, fmt, scaling)
    return relative_error(w, dequantize_weight(q, s))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("make", [gaussian, heavy_tailed], ids=["gaussian", "heavy_tailed"])
def test_per_channel_beats_per_tensor_beats_plain_cast(fmt, make):
    w = make()
    per_channel, per_tensor = error(w, fmt, "per_channel"), error(w, fmt, "per_tensor")
    cast = relative_error(w, w.to(fp8_dtype(fmt)).float())
    if fmt == "float8_e5m2" and make is gaussian:
        # e5m2's 5-bit exponent covers a Gaussian's range whatever the scale: per-row scales cannot help,
        # the two tie within sampling noise (both still beat the cast, which wastes the top of the range)
        assert per_channel < 1.001 * per_tensor and per_tensor < cast, (per_channel, per_tensor, cast)
    else:
        assert per_channel < per_tensor < cast, (per_channel, per_tensor, cast)
    # e4m3 has 3 mantissa bits (half-ulp 2^-4 = 6%), e5m2 has 2 (12.5%): rms error sits well below those
    assert per_channel < (0.04 if fmt == "float8_e4m3fn" else 0.08)


def test_outlier_channels_push_per_tensor_rows_into_subnormals():
    """e4m3's normal range spans 2^-6..448 (~15 binades), so a per-tensor scale only hurts once one channel is
    ~10^4 x the others: then ordinary rows land in the subnormals, where per-channel scales keep them normal."""
    w = gaussian()
    w[7] *= 1e4
    per_channel = error(w[:7], "float8_e4m3fn", "per_channel")
    q, s = quantize_weight(w, "float8_e4m3fn", "per_tensor")
    per_tensor = relative_error(w[:7], dequantize_weight(q, s)[:7])
    assert per_tensor > 1.5 * per_channel, (per_tensor, per_channel)


@pytest.mark.parametrize("fmt", FORMATS)
def test_representable_values_round_trip_exactly(fmt):
    dtype = getattr(torch, fmt)
    # every finite value of the format, spread over rows that each reach the format's max
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    values = values[torch.isfinite(values)]
    row = torch.cat([values, torch.tensor([fp8_max(fmt)])])
    w = torch.stack([row, -row, row * 0.5])  # x0.5 stays representable except at the bottom of subnormals
    w[2] = torch.where(w[2].abs() >= 2 * torch.finfo(dtype).smallest_normal, w[2], torch.zeros(()))
    q, s = quantize_weight(w, fmt, "per_channel")
    assert torch.equal(dequantize_weight(q, s), w)
    assert torch.equal(s.flatten(), torch.tensor([1.0, 1.0, 0.5]))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
def test_zero_rows_and_zero_tensor_give_zeros_not_nan(fmt, scaling):
    w = gaussian(8, 16)
    w[3] = 0
    q, s = quantize_weight(w, fmt, scaling)
    out = dequantize_weight(q, s)
    assert torch.isfinite(out).all() and torch.equal(out[3], torch.zeros(16))
    q, s = quantize_weight(torch.zeros(4, 4), fmt, scaling)
    assert torch.equal(dequantize_weight(q, s), torch.zeros(4, 4))


@pytest.mark.parametrize("fmt", FORMATS)
def test_huge_and_subnormal_magnitudes_keep_relative_precision(fmt):
    for magnitude in (1e-30, 1e-8, 1e4, 1e30):
        w = gaussian(32, 64) * magnitude
        assert error(w, fmt, "per_channel") < 0.08, magnitude


def test_scale_shapes_and_dtype():
    w = gaussian(16, 32).half()
    assert quantize_weight(w, "float8_e4m3fn", "per_channel")[1].shape == (16, 1)
    assert quantize_weight(w, "float8_e4m3fn", "per_tensor")[1].shape == ()
    q, s = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert float(q.float().abs().max()) == fp8_max("float8_e4m3fn")  # absmax maps to the top of the range


def test_input_is_not_modified():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = gaussian(64, 64).to(dtype)
        before = w.clone()
        quantize_weight(w)
        assert torch.equal(w, before), dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_refused_naming_the_layer(bad):
    w = gaussian(8, 8)
    w[2, 3] = bad
    with pytest.raises(ValueError, match=r"joint_blocks\.3\.x_block\.mlp\.fc1.*NaN/Inf.*protect_patterns"):
        quantize_weight(w, name="joint_blocks.3.x_block.mlp.fc1")


def test_bad_arguments_name_the_input():
    with pytest.raises(ValueError, match="fp8_format"):
        quantize_weight(gaussian(4, 4), "float8_e3m4")
    with pytest.raises(ValueError, match="scaling"):
        quantize_weight(gaussian(4, 4), scaling="per_block")
    q, _ = quantize_weight(gaussian(4, 4))
    with pytest.raises(ValueError, match="already"):
        quantize_weight(q)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
def test_error_summed_while_quantizing_matches_the_float64_reference(fmt, scaling):
    weight = (torch.randn(700, 300, generator=torch.Generator().manual_seed(5)) * 0.03).half()
    weight[3] *= 40  # an outlier row
    qweight, scale, error = quantize_weight_with_error(weight, fmt, scaling)
    q_plain, s_plain = quantize_weight(weight, fmt, scaling)
    assert torch.equal(qweight.view(torch.uint8), q_plain.view(torch.uint8)) and torch.equal(scale, s_plain)
    assert error == pytest.approx(relative_error(weight, dequantize_weight(qweight, scale, torch.float64)), rel=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sincos_table_goes_fp8_with_scale_one_and_beats_an_absmax_scale(fmt):
    table = sincos_pos_embed((1, 24 * 24, 128)).half()
    fp8, error, why = quantize_unit_scale(table, fmt, name="pos_embed")
    assert why == "" and fp8.dtype == fp8_dtype(fmt) and fp8.shape == table.shape
    assert torch.equal(fp8.float(), table.float().to(fp8_dtype(fmt)).float())  # scale 1.0: what stock reads
    assert error == pytest.approx(relative_error(table, fp8.float()))
    assert error < quantize_weight_with_error(table, fmt, "per_tensor")[2]
    assert error < {"float8_e4m3fn": 0.025, "float8_e5m2": 0.05}[fmt]


def test_tables_that_need_a_scale_stay_16bit_and_say_why():
    small = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0)) * 0.002  # mostly subnormal in e4m3
    fp8, error, why = quantize_unit_scale(small, "float8_e4m3fn", name="pos_embed")
    assert fp8 is None and error > 0.05 and why.startswith("pos_embed: FP8 with scale 1.0 would err")
    huge = torch.full((1, 4, 8), 1000.0)
    fp8, error, why = quantize_unit_scale(huge, "float8_e4m3fn", name="pos_embed")
    assert fp8 is None and "exceed float8_e4m3fn's range" in why
    with pytest.raises(ValueError, match="pos_embed: weight holds 1 NaN/Inf"):
        quantize_unit_scale(torch.tensor([[[0.5, float("nan")]]]), "float8_e4m3fn", name="pos_embed")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_fast_cpu_widening_equals_torch_conversion_for_every_code(fmt, dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(fp8_dtype(fmt))
    reference = codes.to(torch.float32)
    finite = torch.isfinite(reference)
    assert torch.equal(dequantize_weight(codes, torch.tensor(1.0), dtype)[finite], codes.to(dtype)[finite])
    scale = torch.full((256, 1), 0.37)
    assert torch.equal(dequantize_weight(codes.reshape(256, 1), scale, dtype)[finite.reshape(256, 1)],
                       (codes.to(dtype).reshape(256, 1) * scale.to(dtype))[finite.reshape(256, 1)])


def test_every_tensor_is_made_on_the_input_device():
    """Under `torch.device("meta")` a tensor made without device= lands on meta and meets the CPU input in an
    op: the error a GPU-resident quantize gave ("Expected all tensors to be on the same device")."""
    table, weight, empty = sincos_pos_embed((1, 64, 32)), gaussian(64, 32), torch.zeros(0, 8)
    with torch.device("meta"):
        fp8, err, why = quantize_unit_scale(table, name="pos_embed")
        outputs = [fp8, *quantize_weight(weight), *quantize_weight(weight, scaling="per_tensor"),
                   *quantize_weight_with_error(weight)[:2], *quantize_weight(empty)]
        outputs.append(dequantize_weight(outputs[1], outputs[2], torch.float16))
    assert why == "" and err < 0.05
    assert {t.device.type for t in outputs} == {"cpu"}
