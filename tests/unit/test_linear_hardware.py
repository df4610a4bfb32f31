"""FP8Linear parity with a float64 reference, both compute paths' arithmetic, and compute=auto per device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch

from sd35_fp8.quant import hardware, linear
from sd35_fp8.quant.formats import dequantize_weight, quantize_weight
from sd35_fp8.quant.hardware import FP8MatmulUnsupported, probe_device, resolve_compute
from sd35_fp8.quant.linear import FP8Linear, scaled_linear

CPU_ROWWISE = hardware.TORCH_VERSION >= hardware.ROWWISE_MIN_TORCH["cpu"]
needs_cpu_rowwise = pytest.mark.skipif(
    not CPU_ROWWISE, reason=f"torch {hardware.TORCH_VERSION}'s CPU _scaled_mm takes tensor-wise scales only; row-wise "
                            f"needs torch >= {hardware.ROWWISE_MIN_TORCH['cpu']} (test_fp8_matmul_arithmetic_emulated "
                            "checks the same arithmetic without it)")


def _linear(out_f=96, in_f=64, bias=True, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


def _fp8(lin: torch.nn.Linear, fmt="float8_e4m3fn", scaling="per_channel", compute="auto") -> FP8Linear:
    return FP8Linear(*quantize_weight(lin.weight.detach(), fmt, scaling), lin.bias, compute)


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_only_matches_float64_reference(fmt, scaling, bias):
    lin = _linear(bias=bias)
    layer = _fp8(lin, fmt, scaling, compute="weight_only")
    x = torch.randn(3, 5, 64)
    reference = x.double() @ dequantize_weight(layer.weight, layer.weight_scale, torch.float64).T
    if bias:
        reference += lin.bias.double()
    out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


def test_the_layer_does_not_touch_the_source_and_keeps_names():
    lin = _linear()
    before = lin.weight.detach().clone()
    layer = _fp8(lin)
    assert torch.equal(lin.weight, before)
    assert set(dict(layer.named_parameters())) == {"weight", "weight_scale", "bias"}
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (96, 1)


def test_functional_path_matches_module():
    lin = _linear()
    q, s = quantize_weight(lin.weight.detach())
    x = torch.randn(4, 64)
    torch.testing.assert_close(scaled_linear(x, q, s, lin.bias), FP8Linear(q, s, lin.bias, "weight_only")(x))


def test_bf16_activations_stay_bf16():
    layer = _fp8(_linear(), compute="weight_only")
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and probe_device("cuda").fp8_matmul else [])


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Run fp8_matmul on the CPU too (torch's CPU _scaled_mm takes row-wise float8 scales) and count the calls."""
    monkeypatch.setattr(linear, "runs_scaled_mm", lambda device: True)
    calls = []
    real = torch._scaled_mm

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counted)
    return calls


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_cpu_rowwise), *DEVICES[1:]])
@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_matmul_matches_dequantize_then_matmul(scaled_mm_calls, device, scaling, dtype):
    if hardware.rowwise_problem(torch.device(device), dtype):
        pytest.skip(hardware.rowwise_problem(torch.device(device), dtype))
    lin = _linear(256, 128).to(device)
    layer = _fp8(lin, scaling=scaling, compute="fp8_matmul" if device == "cuda" else "auto").to(device)
    x = torch.randn(3, 24, 128, device=device, dtype=dtype)
    out = scaled_linear(x, layer.weight, layer.weight_scale, layer.bias, "fp8_matmul")
    weight = dequantize_weight(layer.weight, layer.weight_scale, torch.float64)
    reference = F.linear(x.double(), weight, lin.bias.detach().double())
    assert len(scaled_mm_calls) == 1, "the FP8 matmul did not run"
    call = scaled_mm_calls[0]
    assert call["scale_a"].shape == (72, 1) and call["scale_b"].shape == (1, 256)  # per token, per channel
    assert call["out_dtype"] == dtype and out.dtype == dtype and out.shape == (3, 24, 256)
    assert (call["bias"] is not None) == (dtype != torch.float32)  # the bias is added inside the FP8 matmul
    # the activation is rounded to e4m3 too: error ~ one e4m3 half-ulp (6%) relative, far less on average
    rel = float((out.double() - reference).norm() / reference.norm())
    assert rel < 0.03, rel


@needs_cpu_rowwise
def test_fp8_matmul_scales_each_token_on_its_own(scaled_mm_calls):
    """One outlier token (x1000, as SD3's activations have) leaves the other tokens' precision alone."""
    layer = _fp8(_linear(64, 128))
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    x[0] *= 1000
    out = scaled_linear(x, layer.weight, layer.weight_scale, layer.bias, "fp8_matmul")
    weight = dequantize_weight(layer.weight, layer.weight_scale, torch.float64)
    reference = F.linear(x.double(), weight, layer.bias.double())
    rest = float((out[1:].double() - reference[1:]).norm() / reference[1:].norm())
    assert len(scaled_mm_calls) == 1 and rest < 0.03, rest


@pytest.mark.parametrize(("fmt", "in_f", "why"), [("float8_e5m2", 128, "e5m2"), ("float8_e4m3fn", 120, "multiples")])
def test_fp8_matmul_falls_back_to_weight_only_where_scaled_mm_cannot_run(scaled_mm_calls, caplog, fmt, in_f, why):
    layer = _fp8(_linear(64, in_f), fmt)
    x = torch.randn(4, in_f)
    with caplog.at_level("INFO", logger="sd35_fp8.quant.linear"):
        out = scaled_linear(x, layer.weight, layer.weight_scale, layer.bias, "fp8_matmul")
    assert scaled_mm_calls == [] and why in caplog.text
    assert torch.equal(out, scaled_linear(x, layer.weight, layer.weight_scale, layer.bias, "weight_only"))


def test_fp8_matmul_stays_off_the_cpu():
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
    monkeypatch.setattr(hardware, "_rowwise_cache", {})


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


# --- the fast path's arithmetic and kernel count -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_matmul_arithmetic_emulated(dtype):
    """quantize_rows + the row-wise scales, multiplied in float64 instead of by _scaled_mm (any torch version):
    the same error bound as the real path, all-zero rows give zeros, and no activation code exceeds e4m3's max."""
    lin = _linear(256, 128).requires_grad_(False)
    q, s = quantize_weight(lin.weight)
    x = torch.randn(72, 128).to(dtype)
    x[3] = 0
    x[5] *= 1000
    xq, x_scale = linear.quantize_rows(x)
    assert xq.dtype == torch.float8_e4m3fn and x_scale.shape == (72, 1) and bool(torch.isfinite(xq.float()).all())
    w_row = linear.weight_scale_row(s, 256)
    assert w_row.shape == (1, 256) and w_row.data_ptr() == s.data_ptr()  # a view: prepared once, follows the scale
    emulated = (xq.double() * x_scale.double()) @ (q.double() * w_row.double().T).T + lin.bias.double()
    reference = F.linear(x.double(), dequantize_weight(q, s, torch.float64), lin.bias.double())
    assert torch.equal(emulated[3], lin.bias.double())
    rest = torch.cat([reference[:5], reference[6:]]), torch.cat([emulated[:5], emulated[6:]])
    rel = float((rest[1] - rest[0]).norm() / rest[0].norm())
    assert rel < 0.03, rel


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops one call dispatches, less views and allocations (no kernel of their own)."""

    NO_KERNEL = {"view", "_unsafe_view", "t", "expand", "reshape", "detach", "alias", "empty", "transpose",
                 "as_strided", "unsqueeze", "squeeze", "_reshape_alias", "lift_fresh"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.NO_KERNEL:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("path", "scaling", "expected"), [
    ("weight_only", "per_channel", ["_to_copy", "mul_", "addmm"]),
    ("weight_only", "per_tensor", ["_to_copy", "mul_", "addmm"]),
    ("fp8_matmul", "per_channel", ["linalg_vector_norm", "div_", "clamp_", "div", "_scaled_mm"]),
    ("fp8_matmul", "per_tensor", ["linalg_vector_norm", "div_", "clamp_", "div", "clone", "_scaled_mm"]),
])
def test_kernels_per_fp8_linear_forward(monkeypatch, path, scaling, expected):
    """The ops one FP8 Linear forward (float16 activations, with bias) runs on a GPU's route, counted on the meta
    device (no arithmetic; the CPU's weight_only widens FP8 its own way). Was 14 for fp8_matmul (abs, amax, casts,
    clamps, two reciprocals, a separate bias add) and 4 for weight_only (a cast of the scale on every call)."""
    monkeypatch.setattr(linear, "runs_scaled_mm", lambda device: True)
    monkeypatch.setattr(linear, "rowwise_problem", lambda device, dtype: None)
    q, s = quantize_weight(_linear(256, 128).weight.detach(), scaling=scaling)
    layer = FP8Linear(q, s, torch.zeros(256, dtype=torch.float16), compute=path).to("meta")
    x = torch.empty(2, 24, 128, dtype=torch.float16, device="meta")
    with _CountOps() as counted:  # the layer's forward less compute_for, which knows no meta device
        out = scaled_linear(x, layer.weight, layer.weight_scale, layer.bias, path)
    assert out.shape == (2, 24, 256) and out.dtype == torch.float16
    assert counted.ops == expected


# --- compute=auto: the faster path as timed on the device ---------------------------------------------------

@pytest.fixture
def timed(monkeypatch):
    """A fake Hopper-class CUDA device (9.0, CUDA 12.9) and a fake timer: `timed.seconds` is what it reports."""
    fake_cuda(monkeypatch, 9, 0)
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    monkeypatch.setattr(linear, "_auto_choice", {})
    calls = []

    def fake_time_paths(device, dtype, out_features, in_features):
        calls.append((str(device), dtype, out_features, in_features))
        return dict(fake_time_paths.seconds)

    fake_time_paths.calls = calls
    monkeypatch.setattr(linear, "time_paths", fake_time_paths)
    return fake_time_paths


@pytest.mark.parametrize(("fp8_s", "expected"), [(0.5, "fp8_matmul"), (0.89, "fp8_matmul"), (0.95, "weight_only"),
                                                 (1.17, "weight_only")])
def test_auto_takes_fp8_matmul_only_where_timed_faster(timed, fp8_s, expected):
    timed.seconds = {"weight_only": 1.0, "fp8_matmul": fp8_s}  # 1.17: the H200's step, 93.1 vs 79.5 ms
    layer = _fp8(_linear(64, 128))
    assert layer.compute_for(torch.device("cuda:0"), torch.float16) == expected
    assert _fp8(_linear(64, 128, seed=1)).compute_for(torch.device("cuda:0"), torch.float16) == expected
    assert timed.calls == [("cuda:0", torch.float16, 64, 128)]  # timed once per device, dtype and shape
    assert _fp8(_linear(64, 128), compute="fp8_matmul").compute_for(torch.device("cuda:0")) == "fp8_matmul"


def test_auto_keeps_weight_only_where_fp8_matmul_fails_to_run(timed, monkeypatch):
    def broken(*args):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(linear, "time_paths", broken)
    assert _fp8(_linear(64, 128)).compute_for(torch.device("cuda:0"), torch.bfloat16) == "weight_only"


def test_auto_on_ada_in_float16_keeps_weight_only_untimed(timed, monkeypatch):
    """sm_89 multiplies row-wise FP8 into bfloat16 only (CUTLASS): float16 models keep weight_only, untimed."""
    fake_cuda(monkeypatch, 8, 9)
    timed.seconds = {"weight_only": 1.0, "fp8_matmul": 0.5}
    layer = _fp8(_linear(64, 128))
    assert layer.compute_for(torch.device("cuda:0"), torch.float16) == "weight_only" and timed.calls == []
    assert layer.compute_for(torch.device("cuda:0"), torch.bfloat16) == "fp8_matmul"
    assert "bfloat16" in hardware.rowwise_problem(torch.device("cuda:0"), torch.float16)


def test_timing_runs_both_paths_for_real(monkeypatch):
    monkeypatch.setattr(linear, "runs_scaled_mm", lambda device: True)
    monkeypatch.setattr(linear, "AUTO_TOKENS", 64)
    seconds = linear.time_paths(torch.device("cpu"), torch.bfloat16, 64, 128)
    assert set(seconds) == {"weight_only", "fp8_matmul"} and all(0 < s < 10 for s in seconds.values())


@pytest.mark.parametrize(("version", "expected"), [("2.11.0", "tensor-wise scales only"), ("2.14.1", None)])
def test_cpu_rowwise_needs_torch_2_14(monkeypatch, version, expected):
    monkeypatch.setattr(hardware, "TORCH_VERSION", hardware.TorchVersion(version))
    monkeypatch.setattr(hardware, "_rowwise_cache", {})
    problem = hardware.rowwise_problem(torch.device("cpu"), torch.bfloat16)
    assert problem == expected or (expected in problem and "torch >= 2.14" in problem)


def test_explicit_fp8_matmul_on_a_torch_without_cuda_rowwise_names_the_version(monkeypatch):
    fake_cuda(monkeypatch, 9, 0)
    monkeypatch.setattr(hardware, "TORCH_VERSION", hardware.TorchVersion("2.4.1"))
    with pytest.raises(FP8MatmulUnsupported, match=r"torch >= 2\.5"):
        resolve_compute("fp8_matmul", "cuda:0")
    assert resolve_compute("auto", "cuda:0") == "weight_only"
