"""Compare Images (SSIM/PSNR): how close an FP8 render is to its FP16 twin."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..quant.metrics import compare_images, difference_image, report_text
from .common import CATEGORY, PackNode


class SD35FP8CompareImages(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35FP8CompareImages",
            display_name="Compare Images (SSIM/PSNR)",
            category=f"{CATEGORY}/utils",
            description="Scores two image batches against each other: SSIM (Wang et al. 2004, Gaussian window) and "
                        "PSNR, plus an amplified difference image. Use it with the same seed on an FP16 and an FP8 "
                        "model.",
            inputs=[io.Image.Input("image_a", tooltip="Reference images, e.g. from the FP16 model."),
                    io.Image.Input("image_b", tooltip="Images to score, same size and count as image_a.")],
            outputs=[
                io.Float.Output(display_name="ssim", tooltip="Mean SSIM over the batch (1.0 = identical)."),
                io.Float.Output(display_name="psnr", tooltip="Mean PSNR in dB (inf = identical)."),
                io.Image.Output(display_name="difference", tooltip="|a - b| amplified 4x, to see where they differ."),
                io.String.Output(display_name="report", tooltip="Per-image scores and a verdict."),
            ],
        )

    @classmethod
    def execute(cls, image_a, image_b) -> io.NodeOutput:
        result = compare_images(image_a, image_b)
        return io.NodeOutput(result["ssim"], result["psnr"], difference_image(image_a, image_b), report_text(result))
