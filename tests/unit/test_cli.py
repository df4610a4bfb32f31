"""The engine's CLI (`sd35-fp8` / `python -m sd35_fp8.quant` once installed: tests/unit/test_packaging.py) convert /
inspect end to end on a fixture, run from this checkout (`tools` registers it as the package sd35_fp8)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tools import engine_cli

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(engine_cli(*args), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_convert_then_inspect(fixture_files, tmp_path):
    out = tmp_path / "large_fp8.safetensors"
    done = run("convert", str(fixture_files["large_all_in_one"]), str(out), "--protect", "joint_blocks.1.*",
               "--scaling", "per_tensor")
    assert done.returncode == 0, done.stderr
    assert "auto: detected sd35_large" in done.stdout and f"wrote {out}" in done.stdout
    assert "quantizing" in done.stderr  # the progress bar
    sd = load_file(str(out))
    assert sd["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].dtype.itemsize == 1
    assert sd["model.diffusion_model.joint_blocks.1.x_block.attn.qkv.weight"].dtype.itemsize == 2
    assert sd["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight_scale"].shape == ()
    info = run("inspect", str(out))
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["layout"] == "native" and data["fp8_layers"] > 0 and data["per_channel_layers"] == 0
    assert data["metadata"]["sd35_fp8.scaling"] == "per_tensor"


def test_cli_errors_are_one_line_and_nonzero(fixture_files, tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    done = run("convert", str(fixture_files["large_transformer"]), str(out))
    assert done.returncode == 2 and "already exists" in done.stderr and out.read_bytes() == b"keep me"
    done = run("convert", str(fixture_files["large_transformer"]), str(tmp_path / "y.safetensors"),
               "--protect", "re:(")
    assert done.returncode == 2 and "protect_patterns line 1" in done.stderr
    assert not (tmp_path / "y.safetensors").exists()


def test_default_layout_is_what_stock_comfyui_runs_natively(fixture_files, tmp_path):
    out = tmp_path / "stock.safetensors"
    done = run("convert", str(fixture_files["large_transformer"]), str(out))
    assert done.returncode == 0, done.stderr
    with safe_open(str(out), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        scales = [f.get_tensor(f"{name}.weight_scale") for name in layers]
        dtypes = {f.get_tensor(f"{name}.weight").dtype for name in layers}
    assert layers and all(v == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True} for v in layers.values())
    assert all(s.numel() == 1 and s.dtype == torch.float32 for s in scales) and dtypes == {torch.float8_e4m3fn}
    conflict = run("convert", str(fixture_files["large_transformer"]), str(tmp_path / "x.safetensors"),
                   "--scaling", "per_channel")
    assert conflict.returncode == 2 and "use --layout auto" in conflict.stderr
    auto = run("convert", str(fixture_files["large_transformer"]), str(tmp_path / "pc.safetensors"), "--layout", "auto")
    assert auto.returncode == 0 and json.loads(run("inspect", str(tmp_path / "pc.safetensors")).stdout)[
        "per_channel_layers"] == len(layers)


def test_quanto_backend_writes_quantos_weights_in_our_layout(fixture_files, tmp_path):
    """--backend quanto: optimum-quanto's qfloat8 per-channel weights, the same layers and the same file layout as
    native; per-channel absmax e4m3 both, so each layer's error matches native's."""
    pytest.importorskip("optimum.quanto")
    outputs = {}
    for backend in ("native", "quanto"):
        outputs[backend] = tmp_path / f"{backend}.safetensors"
        done = run("convert", str(fixture_files["large_transformer"]), str(outputs[backend]), "--layout", "auto",
                   "--backend", backend)
        assert done.returncode == 0, done.stderr
        assert f"(backend {backend})" in done.stdout
    native, quanto = (load_file(str(outputs[b])) for b in ("native", "quanto"))
    assert native.keys() == quanto.keys()
    source = load_file(str(fixture_files["large_transformer"]))
    fp8 = [k for k, v in quanto.items() if v.dtype == torch.float8_e4m3fn and v.dim() == 2]
    assert fp8 and fp8 == [k for k, v in native.items() if v.dtype == torch.float8_e4m3fn and v.dim() == 2]
    for key in fp8:
        scale = quanto[key.replace(".weight", ".weight_scale")]
        assert scale.shape == (quanto[key].shape[0], 1) and scale.dtype == torch.float32
        ref = source[key].float()
        errors = [float((f[key].float() * f[key.replace(".weight", ".weight_scale")] - ref).norm() / ref.norm())
                  for f in (native, quanto)]
        assert errors[1] == pytest.approx(errors[0], rel=0.2), key
    refused = run("convert", str(fixture_files["large_transformer"]), str(tmp_path / "x.safetensors"),
                  "--backend", "quanto")
    assert refused.returncode == 2 and "--layout auto" in refused.stderr


def test_budget_fits_the_written_diffusion_model_and_bad_budgets_are_named(fixture_files, tmp_path):
    source = fixture_files["large_transformer"]
    sixteen = sum(t.numel() * t.element_size() for t in load_file(str(source)).values())
    budget_gib = 0.7 * sixteen / 2**30
    out = tmp_path / "budget.safetensors"
    done = run("convert", str(source), str(out), "--budget", f"{budget_gib:.9f}")
    assert done.returncode == 0, done.stderr
    assert "memory budget:" in done.stdout and "kept 16-bit by the budget" in done.stdout
    written = load_file(str(out))
    assert sum(t.numel() * t.element_size() for t in written.values()) <= budget_gib * 2**30
    wide = [k for k, t in written.items() if k.endswith(".weight") and t.dim() == 2 and t.dtype.itemsize == 2]
    assert len(wide) > 2  # more than the preset's embedders and final layer
    for bad, message in (("lots", "--budget: 'lots' is not a memory budget"),
                         ("0.00001", "below the smallest this model reaches")):
        done = run("convert", str(source), str(tmp_path / "x.safetensors"), "--budget", bad)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not (tmp_path / "x.safetensors").exists()


def test_budget_auto_without_a_gpu_is_free_ram_less_sampling_or_an_error_saying_why(monkeypatch):
    from sd35_fp8.quant import cli
    from sd35_fp8.quant.budget import GIB, sampling_bytes

    # ComfyUI 0.8's estimate for SD3.5 at 1024x1024 with cfg: 2 x 128 x 128 x 0.15 x 1.6 MiB on the CPU
    assert sampling_bytes(on_gpu=False) == pytest.approx(7864.32 * 2**20, abs=1)
    assert sampling_bytes(on_gpu=True) == pytest.approx(1048.576 * 2**20, abs=1)  # 2 bytes x 0.01 on a GPU
    monkeypatch.setattr(cli, "host_memory", lambda field="MemTotal": 20 * GIB)  # this machine has no GPU
    assert cli._budget("auto") == 20 * GIB - sampling_bytes(on_gpu=False) - GIB  # margin: 5% of the free bytes
    monkeypatch.setattr(cli, "host_memory", lambda field="MemTotal": 8 * GIB)
    with pytest.raises(ValueError, match="auto: this machine's RAM .* nothing is left for the weights"):
        cli._budget("auto")
    monkeypatch.setattr(cli, "host_memory", lambda field="MemTotal": 0)  # a machine without /proc/meminfo
    with pytest.raises(ValueError, match="--budget auto: no GPU and no /proc/meminfo.*--budget 10.5"):
        cli._budget("auto")
