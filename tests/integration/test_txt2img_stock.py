"""A stock-node txt2img prompt runs on every all-in-one fixture and writes a real PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from prompts import txt2img


@pytest.mark.parametrize("variant", ["large", "medium", "large_turbo"])
def test_stock_txt2img_writes_png(runner, comfy_base, fixture_files, variant):
    ckpt = fixture_files[f"{variant}_all_in_one"].name
    outputs = runner.run(txt2img(ckpt, prefix=f"stock_{variant}"))
    image = runner.node_outputs("6")[0]
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()
    saved = outputs["7"]["images"][0]
    png = comfy_base / "output" / saved["subfolder"] / saved["filename"]
    pixels = np.asarray(Image.open(png))
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 1.0, "decoded image is flat: the fixture weights produce no signal"
