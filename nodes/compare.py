"""Compare Images (SSIM/PSNR): how close an FP8 render is to its FP16 twin."""

from __future__ import annotations

from ..quant.metrics import compare_images, difference_image, report_text
from .common import CATEGORY


class SD35FP8CompareImages:
    TITLE = "Compare Images (SSIM/PSNR)"
    CATEGORY = f"{CATEGORY}/utils"
    DESCRIPTION = ("Scores two image batches against each other: SSIM (Wang et al. 2004, Gaussian window) and PSNR, "
                   "plus an amplified difference image. Use it with the same seed on an FP16 and an FP8 model.")
    RETURN_TYPES = ("FLOAT", "FLOAT", "IMAGE", "STRING")
    RETURN_NAMES = ("ssim", "psnr", "difference", "report")
    OUTPUT_TOOLTIPS = ("Mean SSIM over the batch (1.0 = identical).", "Mean PSNR in dB (inf = identical).",
                       "|a - b| amplified 4x, to see where they differ.", "Per-image scores and a verdict.")
    FUNCTION = "compare"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image_a": ("IMAGE", {"tooltip": "Reference images, e.g. from the FP16 model."}),
            "image_b": ("IMAGE", {"tooltip": "Images to score, same size and count as image_a."}),
        }}

    def compare(self, image_a, image_b):
        result = compare_images(image_a, image_b)
        diff = difference_image(image_a, image_b)
        return (float(result["ssim"]), float(result["psnr"]), diff, report_text(result))
