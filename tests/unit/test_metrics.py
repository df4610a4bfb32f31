"""SSIM/PSNR match scikit-image; size and batch mismatches are clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sd35_fp8.quant.metrics import compare_images, difference_image, report_text


def _images(b=2, h=48, w=40, c=3, noise=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(b, h, w, c, generator=gen)
    return a, (a + noise * torch.randn(a.shape, generator=gen)).clamp(0, 1)


@pytest.mark.parametrize(("noise", "c"), [(0.01, 3), (0.1, 3), (0.3, 1), (0.05, 4)])
def test_matches_scikit_image(noise, c):
    a, b = _images(c=c, noise=noise)
    result = compare_images(a, b)
    for i, (ssim, psnr) in enumerate(result["per_image"]):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        ref_ssim = structural_similarity(x, y, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False)
        assert ssim == pytest.approx(ref_ssim, abs=1e-9)
        assert psnr == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), abs=1e-9)
    assert result["ssim"] == pytest.approx(np.mean([s for s, _ in result["per_image"]]))


def test_identical_images():
    a, _ = _images()
    result = compare_images(a, a.clone())
    assert result["ssim"] == pytest.approx(1.0) and math.isinf(result["psnr"])
    assert "visually identical" in report_text(result)
    assert torch.equal(difference_image(a, a), torch.zeros_like(a))


def test_difference_image_is_amplified_and_clamped():
    a = torch.zeros(1, 16, 16, 3)
    b = a.clone()
    b[0, 0, 0] = 0.1
    b[0, 1, 1] = 0.9
    diff = difference_image(a, b)
    assert diff[0, 0, 0, 0] == pytest.approx(0.4) and diff[0, 1, 1, 0] == 1.0 and diff.dtype == torch.float32


def test_mismatches_name_both_inputs_and_the_fix():
    a, _ = _images(b=2)
    with pytest.raises(ValueError, match="image_a has 2 image.*image_b has 1.*batch"):
        compare_images(a, a[:1])
    with pytest.raises(ValueError, match="image_a is 40x48.*image_b is 48x40.*ImageScale"):
        compare_images(a, a.transpose(1, 2))
    with pytest.raises(ValueError, match="at least 11x11"):
        compare_images(a[:, :8, :8], a[:, :8, :8])
