"""The GPU benchmark's CPU smoke run: `python -m bench.gpu --device cpu` end to end on the tiny architecture,
every variant in its own process through the real loaders, so the script sent to a GPU machine is known to run.
Once per `make test`: on ComfyUI 0.8.0 (the host the GPU run uses), not in FP8-device mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tools import comfy_host

pytestmark = pytest.mark.skipif(comfy_host.host_version() != "0.8.0" or comfy_host.fp8_device_mode(),
                                reason="runs once: on ComfyUI 0.8.0, outside FP8-device mode")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_benchmark_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    modes = "stock_fp16,stock_on_ours,ours_auto,ours_fp8_matmul,ours_comfyui_native"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--variants", "tiny_large",
                           "--modes", modes, "--pixels", "64", "--repeats", "2", "--profile", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, COMFY_HOST="0.8.0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke_test"] is True and result["comfyui"] == "0.8.0"
    rows = result["results"]["tiny_large"]["rows"]
    assert "no FP8 matmul" in rows["ours_fp8_matmul"]["skipped"]  # a CPU: the path is skipped, saying why
    for mode in ("stock_fp16", "stock_on_ours", "ours_auto", "ours_comfyui_native"):
        assert rows[mode]["finite"] and len(rows[mode]["ms"]) == 2 and rows[mode]["load_s"] > 0
    ratios = result["ratios"]["tiny_large"]
    assert set(ratios) >= {"step_ours_over_fp16", "step_ours_over_best_stock_fp8", "peak_vram_ours_over_fp16",
                           "load_ours_over_stock_fp16", "rel_err_ours", "rel_err_best_stock_fp8"}
    assert rows["stock_fp16"]["rel_err"] == 0 and 0 < ratios["rel_err_ours"] < 0.05
    assert 0 < ratios["rel_err_best_stock_fp8"] < 0.05 and ratios["best_stock_fp8"] == "stock_on_ours"
    # the handoff is the stock route on the same bits: ComfyUI's layers, one rounding, the same output
    assert abs(rows["ours_comfyui_native"]["rel_err"] - rows["stock_on_ours"]["rel_err"]) < 1e-3
    for mode in ("stock_fp16", "ours_auto", "ours_comfyui_native"):
        assert "Self CPU" in (tmp_path / f"profile_tiny_large_{mode}.txt").read_text()
