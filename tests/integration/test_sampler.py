"""SD3.5 Sampler equals the stock nodes it is built from, and reports stats."""

from __future__ import annotations

import pytest
import torch
from prompts import encode, ksampler, our_sampler


def _base(ckpt: str) -> dict:
    return {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck"),
            "msd3": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["ck", 0], "shift": 3.0}},
            "prev": {"class_type": "PreviewAny", "inputs": {"source": ["ours", 1]}}}


def test_custom_equals_modelsamplingsd3_plus_ksampler(runner, fixture_files):
    prompt = _base(fixture_files["medium_all_in_one"].name)
    prompt["stock"] = ksampler(["msd3", 0], sampler="dpmpp_2m")
    prompt["ours"] = our_sampler(["ck", 0], sampler="dpmpp_2m")
    prompt["prev_stock"] = {"class_type": "PreviewAny", "inputs": {"source": ["stock", 0]}}
    runner.run(prompt)
    ours, stats = runner.node_outputs("ours")
    assert torch.equal(ours["samples"], runner.node_outputs("stock")[0]["samples"])
    assert "s/step" in stats and "steps=3" in stats


def test_skip_layers_equal_stock_skiplayerguidancesd3(runner, fixture_files):
    prompt = _base(fixture_files["medium_all_in_one"].name)
    prompt["slg"] = {"class_type": "SkipLayerGuidanceSD3", "inputs": {
        "model": ["msd3", 0], "layers": "1,2", "scale": 3.0, "start_percent": 0.0, "end_percent": 1.0}}
    prompt["stock"] = ksampler(["slg", 0])
    prompt["plain"] = ksampler(["msd3", 0])
    prompt["ours"] = our_sampler(["ck", 0], skip_layers="1,2", skip_scale=3.0, skip_start=0.0, skip_end=1.0)
    for n in ("stock", "plain"):
        prompt[f"prev_{n}"] = {"class_type": "PreviewAny", "inputs": {"source": [n, 0]}}
    runner.run(prompt)
    ours = runner.node_outputs("ours")[0]["samples"]
    assert torch.equal(ours, runner.node_outputs("stock")[0]["samples"])
    assert not torch.equal(ours, runner.node_outputs("plain")[0]["samples"]), "skip layers had no effect"


@pytest.mark.parametrize("preset,steps", [("sd35_large_turbo", 4), ("sd35_medium", 40)])
def test_presets_fill_in_settings(runner, fixture_files, preset, steps):
    prompt = _base(fixture_files["medium_all_in_one"].name)
    prompt["ours"] = our_sampler(["ck", 0], preset=preset, steps=1)
    prompt["ours"]["inputs"]["steps"] = 1  # overridden by the preset
    runner.run(prompt)
    stats = runner.node_outputs("ours")[1]
    assert f"steps={steps}" in stats
    if preset == "sd35_medium":
        assert "skip_layers=7,8,9" in stats and "do not exist" in stats  # tiny model has 3 blocks
