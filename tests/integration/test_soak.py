"""The short soak for `make test`: consecutive quantize + sample prompts in one real ComfyUI server.

bench/soak.py runs the long version (50 prompts) for the README figure. Here 12 prompts: after 4 warm-up
prompts the server must hold exactly as many live tensors as before (the executor's cache swaps each
prompt's outputs for the next one's), their bytes must not grow, and RSS must stay within 5%.
A pack that kept every quantized model alive (the leak this guards against; tried by hand by appending
each Quantize Model output to a module-level list) adds 51 tensors and 0.95 MB of tensor storage per
prompt on these tiny fixtures and fails the first two bounds on the first prompt after warm-up, while its
RSS ratio stays at 1.002: on tiny models RSS alone would not show the leak, the tensor counts do.
"""

from __future__ import annotations

from bench import soak

PROMPTS = 12
WARMUP = 4
MAX_TENSOR_GROWTH = 16  # live torch.Tensor objects; measured: 0
MAX_TENSOR_MB_GROWTH = 0.5  # MB of distinct tensor storages; measured: 0.0
MAX_RSS_RATIO = 1.05  # the goal; measured: ~1.001


def test_short_soak_holds_memory_flat(comfy_dir, fixture_files):
    result = soak.run(PROMPTS, WARMUP, comfy_dir=comfy_dir, checkpoint=fixture_files["large_all_in_one"],
                      transformer=fixture_files["large_transformer"])
    assert result["failed"] == 0 and result["server_alive_at_end"], result["errors"]
    assert len(result["live_tensors"]) == len(result["rss_mb"]) == PROMPTS
    assert result["live_tensors"][0] > 100, "the probe does not see the model's tensors"
    assert result["tensor_max_growth"] <= MAX_TENSOR_GROWTH, result["live_tensors"]
    assert abs(result["tensor_mb_growth"]) <= MAX_TENSOR_MB_GROWTH, result["tensor_mb"]
    assert result["rss_growth_ratio"] <= MAX_RSS_RATIO, result["rss_mb"]
