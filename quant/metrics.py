"""Image similarity: SSIM (Wang et al. 2004) and PSNR, matching scikit-image's definitions.

SSIM uses a Gaussian window (sigma 1.5, truncated at 3.5 sigma: 11x11), K1=0.01, K2=0.03,
population covariances, data range 1.0, the mean over the image interior (skimage crops the
half-window border) and over channels. Computed in float64 with a valid (unpadded)
separable convolution: exactly the interior skimage averages. Images are ComfyUI IMAGE
tensors: [batch, height, width, channels], values in 0..1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIGMA = 1.5
TRUNCATE = 3.5
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # of the window: 11x11 pixels
K1, K2 = 0.01, 0.03
DIFF_GAIN = 4.0


def _gaussian_kernel() -> torch.Tensor:
    x = torch.arange(-RADIUS, RADIUS + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / SIGMA) ** 2)
    return k / k.sum()


def check_same_size(image_a: torch.Tensor, image_b: torch.Tensor) -> None:
    for name, img in (("image_a", image_a), ("image_b", image_b)):
        if img.dim() != 4:
            raise ValueError(f"{name}: expected an IMAGE batch [batch, height, width, channels], "
                             f"got {tuple(img.shape)}")
    if image_a.shape[0] != image_b.shape[0]:
        raise ValueError(f"image_a has {image_a.shape[0]} image(s) but image_b has {image_b.shape[0]}: compare "
                         "batches of the same size (same batch_size in both latents, or pick one with ImageFromBatch)")
    if image_a.shape[1:] != image_b.shape[1:]:
        raise ValueError(f"image_a is {_size(image_a)} but image_b is {_size(image_b)}: compare images of the "
                         "same size (same latent width/height, or resize one with ImageScale)")
    window = 2 * RADIUS + 1
    if min(image_a.shape[1], image_a.shape[2]) < window:
        raise ValueError(f"image_a/image_b: SSIM needs images of at least {window}x{window} pixels, "
                         f"got {_size(image_a)}")


def _size(img: torch.Tensor) -> str:
    return f"{img.shape[2]}x{img.shape[1]} (w x h) with {img.shape[3]} channel(s)"


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Valid separable convolution of [N, 1, H, W]."""
    k = kernel.to(x.device)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return F.conv2d(x, k.view(1, 1, 1, -1))


def ssim_per_image(image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair (mean over the interior and the channels), float64 [batch]."""
    check_same_size(image_a, image_b)
    b, h, w, c = image_a.shape
    x = image_a.double().permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
    y = image_b.double().permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
    kernel = _gaussian_kernel()
    mu_x, mu_y = _blur(x, kernel), _blur(y, kernel)
    sxx = _blur(x * x, kernel) - mu_x * mu_x
    syy = _blur(y * y, kernel) - mu_y * mu_y
    sxy = _blur(x * y, kernel) - mu_x * mu_y
    c1, c2 = K1**2, K2**2  # data range 1.0
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.reshape(b, c, -1).mean(dim=2).mean(dim=1)


def psnr_per_image(image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each pair (inf where identical), float64 [batch]."""
    check_same_size(image_a, image_b)
    mse = (image_a.double() - image_b.double()).pow(2).flatten(1).mean(dim=1)
    return torch.where(mse > 0, 10 * torch.log10(1.0 / mse), torch.full_like(mse, math.inf))


def compare_images(image_a: torch.Tensor, image_b: torch.Tensor) -> dict:
    ssim = ssim_per_image(image_a, image_b)
    psnr = psnr_per_image(image_a, image_b)
    per_image = list(zip(ssim.tolist(), psnr.tolist(), strict=True))
    return {"ssim": float(ssim.mean()), "psnr": float(psnr.mean()), "per_image": per_image}


def difference_image(image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
    """|a - b| amplified DIFF_GAIN times, as an IMAGE (float32, 0..1)."""
    check_same_size(image_a, image_b)
    return ((image_a.float() - image_b.float()).abs() * DIFF_GAIN).clamp_(0.0, 1.0)


def verdict(ssim: float) -> str:
    if ssim >= 0.98:
        return "visually identical"
    if ssim >= 0.90:
        return "close: small differences in fine detail"
    return "visibly different"


def report_text(result: dict) -> str:
    lines = [f"SSIM {result['ssim']:.4f}  PSNR {result['psnr']:.2f} dB  ({verdict(result['ssim'])})"]
    if len(result["per_image"]) > 1:
        lines += [f"image {i}: SSIM {s:.4f}  PSNR {p:.2f} dB" for i, (s, p) in enumerate(result["per_image"])]
    lines.append(f"difference image: |a - b| x {DIFF_GAIN:g}")
    return "\n".join(lines)
