"""Property tests (hypothesis) for the FP8 engine: any shape, dtype and value the engine may meet.

Values come from hypothesis' float strategies, which favour the awkward ones: zeros of both signs,
subnormals, the dtype's largest values, mixed signs and repeated values. For every finite input the
engine must not crash, must not produce NaN/Inf, and each element's error must stay within the format's
rounding bound: half a unit in the last place (2^-4 relative for e4m3fn, 2^-3 for e5m2), or half the
smallest FP8 subnormal times the row's scale for values that land in the FP8 subnormal range.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import safe_open

from sd35_fp8.quant.checkpoint import check_safetensors
from sd35_fp8.quant.formats import (
    dequantize_weight,
    fp8_max,
    quantize_weight,
    quantize_with_scale,
    relative_error,
)
from sd35_fp8.quant.linear import scaled_linear
from sd35_fp8.quant.policy import parse_patterns

FORMATS = ("float8_e4m3fn", "float8_e5m2")
MANTISSA_BITS = {"float8_e4m3fn": 3, "float8_e5m2": 2}
SMALLEST_SUBNORMAL = {"float8_e4m3fn": 2.0**-9, "float8_e5m2": 2.0**-16}
TINY32 = torch.finfo(torch.float32).tiny  # smallest normal float32
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def scale_is_normal(absmax: float, fmt: str) -> bool:
    """The row's float32 scale absmax / fp8_max is a normal float32 (or the row is all zeros). Rows below
    that (|w| < ~5e-36) hit a known engine limit: see test_rows_below_float32_scale_range_give_no_nan."""
    return absmax == 0.0 or absmax / fp8_max(fmt) >= TINY32


@st.composite
def weights(draw, max_side: int = 24) -> torch.Tensor:
    """A finite 2-D float tensor of float32, float16 or bfloat16 (bfloat16 drawn as float32, then rounded)."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    width = 16 if dtype == torch.float16 else 32
    shape = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    elements = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True, width=width)
    array = draw(hnp.arrays("float16" if width == 16 else "float32", shape, elements=elements))
    tensor = torch.from_numpy(array.copy()).to(dtype)
    assume(bool(torch.isfinite(tensor).all()))  # float32 values just below its max round to inf in bfloat16
    return tensor


def error_bound(weight: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-element bound on |dequantize(quantize(w)) - w| (with float32 rounding slack)."""
    w = weight.double().abs()
    s = scale.double().expand_as(w)
    relative = 2.0 ** -(MANTISSA_BITS[fmt] + 1) + 2.0**-20
    return relative * w + (SMALLEST_SUBNORMAL[fmt] / 2) * s * (1 + 2.0**-20) + 2 * 2.0**-149


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
@SETTINGS
@given(weight=weights())
def test_quantize_is_finite_and_within_the_format_bound(fmt, scaling, weight):
    absmax = weight.float().abs().amax(dim=1) if scaling == "per_channel" else weight.float().abs().amax()[None]
    assume(all(scale_is_normal(float(a), fmt) for a in absmax))
    original = weight.clone()
    qweight, scale = quantize_weight(weight, fmt, scaling, name="layer")
    assert torch.equal(weight, original), "the input was modified"
    assert qweight.dtype == getattr(torch, fmt) and qweight.shape == weight.shape
    assert scale.dtype == torch.float32 and scale.shape == ((weight.shape[0], 1) if scaling == "per_channel" else ())
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    real = dequantize_weight(qweight, scale)
    assert bool(torch.isfinite(real).all()), "NaN/Inf from finite input"
    err = (real.double() - weight.double()).abs()
    bound = error_bound(weight, scale, fmt)
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (f"element {worst}: w={weight.flatten()[worst].item()!r} "
                                        f"got {real.flatten()[worst].item()!r}, bound {bound.flatten()[worst].item()}")
    # signs kept, order kept within a row (rounding is monotone), zeros stay zeros
    w = weight.float()
    assert bool(((real == 0) | (torch.sign(real) == torch.sign(w))).all())
    assert bool((real[w == 0] == 0).all())
    order = torch.argsort(w, dim=1)
    assert bool((torch.diff(torch.gather(real, 1, order), dim=1) >= 0).all())
    # and so is the whole tensor's relative error (the figure the report shows)
    if float(w.double().norm()) > 0:
        assert relative_error(weight, real) <= float(bound.norm() / w.double().norm()) * (1 + 1e-9)


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(weight=weights())
def test_dequantized_values_are_a_fixed_point(fmt, weight):
    """Quantizing the dequantized weight again with the same scale gives the same FP8 bits."""
    scale = quantize_weight(weight, fmt, "per_channel")[1]
    assume(all(scale_is_normal(float(a), fmt) for a in weight.float().abs().amax(dim=1)))
    qweight = quantize_with_scale(weight, scale, fmt)
    real = dequantize_weight(qweight, scale)
    exact = (real == 0) | (real.abs() >= TINY32)  # products that fell into float32 subnormals lost bits
    again = quantize_with_scale(real, scale, fmt)
    assert torch.equal(again.view(torch.uint8)[exact], qweight.view(torch.uint8)[exact])


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(magnitude=st.floats(1e3, 1e30), data=st.data())
def test_huge_weights_need_the_scale(fmt, magnitude, data):
    """Weights far beyond the format's range quantize finite with the usual error; a bare cast clips or
    overflows them."""
    rows, cols = data.draw(st.integers(1, 16)), data.draw(st.integers(2, 16))
    signs = data.draw(hnp.arrays("float32", (rows, cols), elements=st.floats(-1, 1, width=32)))
    weight = torch.from_numpy(signs.copy()) * magnitude
    weight[:, 0] = magnitude  # every row reaches the magnitude
    qweight, scale = quantize_weight(weight, fmt, "per_channel")
    real = dequantize_weight(qweight, scale)
    assert bool(torch.isfinite(real).all())
    assert relative_error(weight, real) <= 2.0 ** -(MANTISSA_BITS[fmt] + 1)
    cast = weight[:, 0].to(getattr(torch, fmt)).float()
    if magnitude > 2 * fp8_max(fmt):  # a bare cast overflows (inf/NaN) or clips to the format's max
        assert bool((~torch.isfinite(cast) | ((cast - magnitude).abs() >= magnitude / 2)).all())


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=60, deadline=None)
@given(weight=weights(), bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]), data=st.data())
def test_nan_or_inf_is_refused_naming_the_layer(fmt, weight, bad, data):
    row, col = data.draw(st.integers(0, weight.shape[0] - 1)), data.draw(st.integers(0, weight.shape[1] - 1))
    weight = weight.clone()
    weight[row, col] = bad
    with pytest.raises(ValueError, match="joint_blocks.3.attn.qkv: weight holds .* NaN/Inf.*protect_patterns"):
        quantize_weight(weight, fmt, data.draw(st.sampled_from(["per_channel", "per_tensor"])),
                        name="joint_blocks.3.attn.qkv")


@SETTINGS
@given(weight=weights(max_side=16), batch=st.integers(1, 4),
       compute_dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_bias=st.booleans(), data=st.data())
def test_fp8_linear_is_finite_and_matches_the_dequantized_matmul(weight, batch, compute_dtype, with_bias, data):
    assume(float(weight.float().abs().max()) < 1e30)  # keep x @ w.T finite in float32
    assume(all(scale_is_normal(float(a), "float8_e4m3fn") for a in weight.float().abs().amax(dim=1)))
    x = torch.from_numpy(data.draw(hnp.arrays("float32", (batch, weight.shape[1]),
                                              elements=st.floats(-4, 4, width=32))).copy()).to(compute_dtype)
    bias = torch.linspace(-1, 1, weight.shape[0]) if with_bias else None
    qweight, scale = quantize_weight(weight, "float8_e4m3fn", "per_channel")
    y = scaled_linear(x, qweight, scale, bias, "weight_only")
    assert y.dtype == compute_dtype and y.shape == (batch, weight.shape[0])
    ref = x.double() @ dequantize_weight(qweight, scale, torch.float64).T + (0 if bias is None else bias.double())
    assume(bool(torch.isfinite(ref).all()) and float(ref.abs().max()) < 1e36)
    assert bool(torch.isfinite(y).all())
    tolerance = (2.0**-7 if compute_dtype == torch.bfloat16 else 1e-5) * (
        x.double().abs() @ dequantize_weight(qweight, scale, torch.float64).abs().T + 1)
    assert bool(((y.double() - ref).abs() <= tolerance * 4).all())


# --------------------------------------------------------------------------- edge cases of the scale

@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_below_float32_scale_range_give_no_nan(fmt):
    weight = torch.tensor([[1e-44, 0.0, -1e-45], [1e-40, 3e-41, 0.0], [1.0, 0.5, -2.0]])
    qweight, scale = quantize_weight(weight, fmt, "per_channel")
    real = dequantize_weight(qweight, scale)
    assert bool(torch.isfinite(real).all())
    assert bool(((real - weight).abs() <= 1e-40).all())


@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
def test_empty_weights_quantize_to_empty(scaling):
    qweight, scale = quantize_weight(torch.empty(5, 0), "float8_e4m3fn", scaling)
    assert qweight.shape == (5, 0) and bool(torch.isfinite(scale).all())


# --------------------------------------------------------------------------- inputs from users and files

@SETTINGS
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_any_pattern_text_parses_or_names_its_line(text):
    try:
        patterns = parse_patterns(text)
    except ValueError as err:
        assert str(err).startswith("protect_patterns line "), err
        return
    for pattern in patterns:
        pattern.match("joint_blocks.0.x_block.attn.qkv")  # never raises


_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "U8": 1, "BOOL": 1}
_JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-5, 40) | st.text(max_size=4),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                     max_size=2), max_leaves=6)


@st.composite
def headers(draw) -> tuple[dict, int]:
    """A valid safetensors header (tensors tiling the data), then zero to two random corruptions."""
    header, end = {}, 0
    for index in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(sorted(_ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = math.prod(shape) * _ITEMSIZE[dtype]
        header[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [end, end + size]}
        end += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
    data_len = end
    tensors = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["field", "drop", "entry", "metadata", "data"]))
        if kind == "data":
            data_len = max(0, data_len + draw(st.integers(-6, 6)))
        elif kind == "metadata":
            header["__metadata__"] = draw(_JSONISH)
        elif tensors:
            key = draw(st.sampled_from(tensors))
            if kind == "entry":
                header[key] = draw(_JSONISH)
            elif isinstance(header[key], dict):
                field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
                if kind == "drop":
                    header[key].pop(field, None)
                else:
                    header[key][field] = draw(st.sampled_from(["F99", "f16", "", "F4"]) | _JSONISH |
                                              st.lists(st.integers(-2, 12), max_size=3))
    return header, data_len


@settings(max_examples=300, deadline=None)
@given(spec=headers())
def test_a_header_is_refused_by_name_or_every_tensor_loads(tmp_path_factory, spec):
    header, data_len = spec
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("hdr") / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(i % 256 for i in range(data_len)))
    try:
        accepted = check_safetensors(path, "model_name")
    except ValueError as err:
        event("refused")
        assert str(err).startswith("model_name: model.safetensors ") and "re-download" in str(err), err
        return
    event("accepted")
    with safe_open(str(path), framework="pt") as f:  # what we accept, safetensors reads
        for key in f.keys():
            f.get_tensor(key)
    assert set(accepted) - {"__metadata__"} == set(header) - {"__metadata__"}


@pytest.mark.parametrize("magic", [b"\x80", b"PK"])
def test_header_lengths_that_look_like_pickle_magic_are_still_safetensors(tmp_path, magic):
    """The first bytes of a safetensors file are its header length: 1 file in 32 starts with 0x80 (a length of
    128 mod 256) and some with b"PK". They are safetensors, not pickles."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    for pad in range(20000):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[: len(magic)] == magic:
            break
    assert path.read_bytes()[: len(magic)] == magic
    header = check_safetensors(path, "ckpt_name")
    assert header["w"]["shape"] == [2]


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=96))
def test_random_bytes_are_refused_by_name(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("blob") / "model.safetensors"
    path.write_bytes(blob)
    try:
        check_safetensors(path, "ckpt_name")
    except ValueError as err:  # UnsafeFileError is a ValueError
        assert str(err).startswith("ckpt_name: model.safetensors "), err
    else:
        with safe_open(str(path), framework="pt") as f:
            assert all(f.get_tensor(k) is not None for k in f.keys())


def test_bound_constants_match_torch():
    for fmt in FORMATS:
        info = torch.finfo(getattr(torch, fmt))
        assert SMALLEST_SUBNORMAL[fmt] == float(info.smallest_normal) * 2.0 ** -MANTISSA_BITS[fmt]
        assert math.isclose(float(info.eps), 2.0 ** -MANTISSA_BITS[fmt])
