"""Re-quantizing a patched FP8 weight: a fresh scale that never clips, exact bits where the patch changed nothing."""

from __future__ import annotations

import pytest
import torch

from sd35_fp8.quant.formats import (
    dequantize_weight,
    fresh_scale,
    quantize_weight,
    quantize_with_scale,
    relative_error,
    requantize,
)


@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
def test_patched_rows_get_a_fresh_scale_and_untouched_rows_keep_their_bits(scaling):
    torch.manual_seed(0)
    qweight, scale = quantize_weight(torch.randn(64, 32) * 0.1, scaling=scaling)
    real = dequantize_weight(qweight, scale)
    patched = real.clone()
    patched[32:] += torch.randn(32, 32) * 0.3  # several times the rows' range
    new_q, new_scale = requantize(patched, scale)
    assert new_scale.shape == scale.shape
    assert relative_error(patched, dequantize_weight(new_q, new_scale)) < 0.04
    clipped = dequantize_weight(quantize_with_scale(patched, scale), scale)  # re-quantized with the old scale
    assert relative_error(patched, clipped) > 0.2
    if scaling == "per_channel":
        assert torch.equal(new_q[:32], qweight[:32]) and torch.equal(new_scale[:32], scale[:32])
    again_q, again_scale = requantize(real, scale)  # a patch of strength 0
    assert torch.equal(again_q, qweight) and torch.equal(again_scale, scale)


def test_shrunk_rows_get_a_finer_scale_and_nan_is_refused():
    qweight, scale = quantize_weight(torch.randn(8, 16))
    real = dequantize_weight(qweight, scale)
    assert bool((fresh_scale(real * 0.4, scale) < scale).all())
    assert torch.equal(fresh_scale(real * 0.6, scale), scale)  # still in the old scale's top binade: kept
    real[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fresh_scale(real, scale)


@pytest.mark.parametrize("headroom", [1.0, 1.1, 1.9])
def test_untouched_rows_keep_their_bits_whatever_headroom_the_scales_have(headroom):
    """Other tools' FP8 files may leave headroom under 448 (absmax / scale < 448): a patch of strength 0, or rows it
    leaves alone, must still re-quantize to the same bits and scale."""
    torch.manual_seed(0)
    qweight, scale = quantize_weight(torch.randn(8, 32))
    scale = scale * headroom
    qweight = quantize_with_scale(dequantize_weight(qweight, scale / headroom), scale)  # a file stored that way
    real = dequantize_weight(qweight, scale)
    new_q, new_scale = requantize(real, scale)
    assert torch.equal(new_scale, scale) and torch.equal(new_q.view(torch.uint8), qweight.view(torch.uint8))
