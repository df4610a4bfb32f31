"""FP8Linear parity with a float64 reference, ComfyUI's LoRA protocol, and compute=auto per device."""

from __future__ import annotations

import pytest
import torch

from quant import hardware
from quant.formats import quantize_weight
from quant.hardware import FP8MatmulUnsupported, probe_device, resolve_compute
from quant.linear import FP8Linear, fp8_linear


def _linear(out_f=96, in_f=64, bias=True, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_only_matches_float64_reference(fmt, scaling, bias):
    lin = _linear(bias=bias)
    layer = FP8Linear.from_linear(lin, fmt, scaling, compute="weight_only")
    x = torch.randn(3, 5, 64)
    reference = x.double() @ layer.dequantized_weight(torch.float64).T
    if bias:
        reference += lin.bias.double()
    out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


def test_from_linear_does_not_touch_the_source_and_keeps_names():
    lin = _linear()
    before = lin.weight.detach().clone()
    layer = FP8Linear.from_linear(lin)
    assert torch.equal(lin.weight, before)
    assert set(dict(layer.named_parameters())) == {"weight", "weight_scale", "bias"}
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (96, 1)


def test_lora_protocol_keeps_scale_and_round_trips():
    """ModelPatcher: temp = convert_weight(weight.float()); temp += delta; set_weight(temp). Unpatch restores weight."""
    layer = FP8Linear.from_linear(_linear())
    scale = layer.weight_scale.clone()
    original = layer.weight
    temp = layer.convert_weight(layer.weight.to(torch.float32), inplace=True)
    torch.testing.assert_close(temp, layer.dequantized_weight())
    delta = torch.randn_like(temp) * 0.01
    layer.set_weight(temp + delta)
    assert torch.equal(layer.weight_scale, scale) and layer.weight is not original
    patched = layer.dequantized_weight()
    assert float((patched - (temp + delta)).norm() / (temp + delta).norm()) < 0.04
    assert torch.equal(layer.set_weight(temp, return_weight=True), original.data)  # re-quantizing is exact


def test_functional_path_matches_module():
    lin = _linear()
    q, s = quantize_weight(lin.weight.detach())
    x = torch.randn(4, 64)
    torch.testing.assert_close(fp8_linear(x, q, s, lin.bias), FP8Linear(q, s, lin.bias, "weight_only")(x))


def test_bf16_activations_stay_bf16():
    layer = FP8Linear.from_linear(_linear(), compute="weight_only")
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.skipif(not (torch.cuda.is_available() and probe_device("cuda").fp8_matmul),
                    reason="needs a CUDA GPU with compute capability >= 8.9")
@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
def test_fp8_matmul_matches_float64_reference(scaling):
    lin = _linear(256, 128).cuda()
    layer = FP8Linear.from_linear(lin, scaling=scaling, compute="fp8_matmul").cuda()
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    reference = x.double() @ layer.dequantized_weight(torch.float64).T + lin.bias.double()
    out = layer(x)
    # the activation is rounded to e4m3 too: error ~ one e4m3 half-ulp (6%) relative, far less on average
    rel = float((out.double() - reference).norm() / reference.norm())
    assert rel < 0.03, rel


# --- compute=auto from (faked) device properties -------------------------------------------------------------

def fake_cuda(monkeypatch, major: int, minor: int, name: str = "Fake GPU", rocm_arch: str | None = None,
              scaled_mm: bool = True) -> None:
    props = hardware._CudaProps(name, major, minor, 24 * 1024**3, rocm_arch or "")
    monkeypatch.setattr(hardware, "_cuda_properties", lambda index: props)
    monkeypatch.setattr(hardware, "_is_rocm", lambda: rocm_arch is not None)
    monkeypatch.setattr(hardware, "_has_scaled_mm", lambda: scaled_mm)


@pytest.mark.parametrize(("cc", "expected"), [((8, 0), "weight_only"), ((8, 6), "weight_only"),
                                              ((8, 9), "fp8_matmul"), ((9, 0), "fp8_matmul"),
                                              ((12, 0), "fp8_matmul"), ((7, 5), "weight_only")])
def test_auto_on_cuda_follows_compute_capability(monkeypatch, cc, expected):
    fake_cuda(monkeypatch, *cc)
    assert resolve_compute("auto", "cuda:0") == expected
    cap = probe_device("cuda:0")
    assert cap.fp8_storage and cap.fp8_matmul == (expected == "fp8_matmul") and cap.memory_mb == 24 * 1024
    assert f"{cc[0]}.{cc[1]}" in cap.to_text()


@pytest.mark.parametrize("cc", [(8, 0), (8, 6)])
def test_explicit_fp8_matmul_on_ampere_is_a_clear_error(monkeypatch, cc):
    fake_cuda(monkeypatch, *cc, name="NVIDIA A100")
    with pytest.raises(FP8MatmulUnsupported, match=r"compute: fp8_matmul cannot run.*8\.9.*weight_only"):
        resolve_compute("fp8_matmul", "cuda:0")
    assert resolve_compute("weight_only", "cuda:0") == "weight_only"


def test_torch_without_scaled_mm_falls_back(monkeypatch):
    fake_cuda(monkeypatch, 9, 0, scaled_mm=False)
    assert resolve_compute("auto", "cuda") == "weight_only"


@pytest.mark.parametrize(("arch", "expected"), [("gfx942:sramecc+:xnack-", "fp8_matmul"),
                                                ("gfx90a", "weight_only"), ("gfx1100", "weight_only")])
def test_rocm_by_architecture(monkeypatch, arch, expected):
    fake_cuda(monkeypatch, 9, 4, rocm_arch=arch)
    assert resolve_compute("auto", "cuda:0") == expected
    assert probe_device("cuda:0").kind == "rocm"


def test_cpu_and_mps():
    cpu = probe_device("cpu")
    assert (cpu.fp8_storage, cpu.fp8_matmul, cpu.recommended_compute) == (True, False, "weight_only")
    assert cpu.memory_mb > 0
    mps = probe_device("mps")
    assert (mps.fp8_storage, mps.fp8_matmul) == (False, False) and "no float8" in mps.reason
    assert resolve_compute("auto", "cpu") == resolve_compute("auto", "mps") == "weight_only"
    with pytest.raises(FP8MatmulUnsupported, match="cpu"):
        resolve_compute("fp8_matmul", "cpu")


def test_bad_device_and_compute_names():
    with pytest.raises(ValueError, match="device"):
        probe_device("xla:0")
    with pytest.raises(ValueError, match="compute"):
        resolve_compute("fast", "cpu")
