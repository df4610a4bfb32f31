"""Hardware capability and image comparison nodes through the executor."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def test_hardware_info_on_this_cpu_host(runner):
    runner.run({"hw": {"class_type": "SD35FP8HardwareInfo", "inputs": {"device": "auto"}},
                "show": {"class_type": "PreviewAny", "inputs": {"source": ["hw", 0]}}})
    report, supported, recommended, memory_mb = runner.node_outputs("hw")
    assert supported is False and recommended == "weight_only"
    assert memory_mb > 1000 and "cpu" in report.lower()


def test_hardware_info_bad_device_is_a_clear_error(runner):
    from tools.comfy_host import PromptError

    with pytest.raises(PromptError, match="device"):
        runner.run({"hw": {"class_type": "SD35FP8HardwareInfo", "inputs": {"device": "gpu7"}},
                    "show": {"class_type": "PreviewAny", "inputs": {"source": ["hw", 0]}}})


def test_compare_matches_skimage_on_decoded_images(runner, fixture_files):
    ck = fixture_files["large_all_in_one"].name
    prompt = {
        "ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ck}},
        "p": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ck", 1], "text": "a fox"}},
        "lat": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
    }
    for tag, seed in (("a", 1), ("b", 2)):
        prompt[f"ks{tag}"] = {"class_type": "KSampler", "inputs": {
            "model": ["ck", 0], "positive": ["p", 0], "negative": ["p", 0], "latent_image": ["lat", 0],
            "seed": seed, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
        prompt[f"dec{tag}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"ks{tag}", 0], "vae": ["ck", 2]}}
    prompt["cmp"] = {"class_type": "SD35FP8CompareImages", "inputs": {"image_a": ["deca", 0], "image_b": ["decb", 0]}}
    prompt["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["cmp", 3]}}
    prompt["diff"] = {"class_type": "PreviewImage", "inputs": {"images": ["cmp", 2]}}
    runner.run(prompt)
    ssim, psnr, diff, report = runner.node_outputs("cmp")
    a, b = runner.node_outputs("deca")[0].numpy(), runner.node_outputs("decb")[0].numpy()
    ref_ssim = np.mean([structural_similarity(a[i], b[i], channel_axis=-1, data_range=1.0, gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False) for i in range(2)])
    ref_psnr = np.mean([peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(2)])
    assert ssim == pytest.approx(ref_ssim, abs=1e-5)
    assert psnr == pytest.approx(ref_psnr, rel=1e-5)
    assert tuple(diff.shape) == a.shape and float(diff.max()) <= 1.0
    assert "SSIM" in report


def test_compare_size_mismatch_names_the_inputs(runner, fixture_files):
    from tools.comfy_host import PromptError

    prompt = {
        "a": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "b": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 64, "batch_size": 1, "color": 0}},
        "cmp": {"class_type": "SD35FP8CompareImages", "inputs": {"image_a": ["a", 0], "image_b": ["b", 0]}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["cmp", 3]}},
    }
    with pytest.raises(PromptError, match="image_a.*image_b|image_b.*image_a"):
        runner.run(prompt)
