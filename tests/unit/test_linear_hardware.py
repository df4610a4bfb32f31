"""FP8Linear parity with a float64 reference, ComfyUI's LoRA protocol, and compute=auto per device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant import hardware, linear
from quant.formats import dequantize_weight, quantize_weight
from quant.hardware import FP8MatmulUnsupported, probe_device, resolve_compute
from quant.linear import FP8Linear, scaled_linear


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
    reference = x.double() @ dequantize_weight(layer.weight, layer.weight_scale, torch.float64).T
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


def test_functional_path_matches_module():
    lin = _linear()
    q, s = quantize_weight(lin.weight.detach())
    x = torch.randn(4, 64)
    torch.testing.assert_close(scaled_linear(x, q, s, lin.bias), FP8Linear(q, s, lin.bias, "weight_only")(x))


def test_bf16_activations_stay_bf16():
    layer = FP8Linear.from_linear(_linear(), compute="weight_only")
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and probe_device("cuda").fp8_matmul else [])


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Run fp8_matmul on the CPU too (torch's CPU _scaled_mm takes row-wise float8 scales) and count the calls."""
    monkeypatch.setattr(linear, "RUN_SCALED_MM_ON_CPU", True)
    calls = []
    real = torch._scaled_mm

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counted)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_matmul_matches_dequantize_then_matmul(scaled_mm_calls, device, scaling, dtype):
    lin = _linear(256, 128).to(device)
    layer = FP8Linear.from_linear(lin, scaling=scaling, compute="fp8_matmul" if device == "cuda" else "auto")
    layer = layer.to(device)
    x = torch.randn(3, 24, 128, device=device, dtype=dtype)
    out = scaled_linear(x, layer.weight, layer.weight_scale, layer.bias, "fp8_matmul")
    weight = dequantize_weight(layer.weight, layer.weight_scale, torch.float64)
    reference = F.linear(x.double(), weight, lin.bias.detach().double())
    assert len(scaled_mm_calls) == 1, "the FP8 matmul did not run"
    call = scaled_mm_calls[0]
    assert call["scale_a"].shape == (72, 1) and call["scale_b"].shape == (1, 256)  # per token, per channel
    assert call["out_dtype"] == dtype and out.dtype == dtype and out.shape == (3, 24, 256)
    # the activation is rounded to e4m3 too: error ~ one e4m3 half-ulp (6%) relative, far less on average
    rel = float((out.double() - reference).norm() / reference.norm())
    assert rel < 0.03, rel


def test_fp8_matmul_scales_each_token_on_its_own(scaled_mm_calls):
    """One outlier token (x1000, as SD3's activations have) leaves the other tokens' precision alone."""
    layer = FP8Linear.from_linear(_linear(64, 128))
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    x[0] *= 1000
    out = scaled_linear(x, layer.weight, layer.weight_scale, layer.bias, "fp8_matmul")
    weight = dequantize_weight(layer.weight, layer.weight_scale, torch.float64)
    reference = F.linear(x.double(), weight, layer.bias.double())
    rest = float((out[1:].double() - reference[1:]).norm() / reference[1:].norm())
    assert len(scaled_mm_calls) == 1 and rest < 0.03, rest


@pytest.mark.parametrize(("fmt", "in_f", "why"), [("float8_e5m2", 128, "e5m2"), ("float8_e4m3fn", 120, "multiples")])
def test_fp8_matmul_falls_back_to_weight_only_where_scaled_mm_cannot_run(scaled_mm_calls, caplog, fmt, in_f, why):
    layer = FP8Linear.from_linear(_linear(64, in_f), fmt)
    x = torch.randn(4, in_f)
    with caplog.at_level("INFO", logger="quant.linear"):
        out = scaled_linear(x, layer.weight, layer.weight_scale, layer.bias, "fp8_matmul")
    assert scaled_mm_calls == [] and why in caplog.text
    assert torch.equal(out, scaled_linear(x, layer.weight, layer.weight_scale, layer.bias, "weight_only"))


def test_fp8_matmul_stays_off_the_cpu_without_the_test_switch():
    assert linear.scaled_mm_problem(torch.zeros(4, 32), torch.zeros(32, 32, dtype=torch.float8_e4m3fn),
                                    torch.ones(())) == "cpu has no FP8 matmul"
    with pytest.raises(FP8MatmulUnsupported, match="compute: fp8_matmul cannot run on cpu"):
        resolve_compute("fp8_matmul", "cpu")


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
