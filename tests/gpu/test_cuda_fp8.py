"""What only a CUDA GPU with FP8 tensor cores shows: quantizing a model held on the GPU, both FP8 paths against
dequantize-then-matmul there, and compute=auto's timed choice. Skipped, saying why, anywhere else; the GPU session
runs them first (bench/README.md, "GPU run")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd35_fp8.quant import linear
from sd35_fp8.quant.config import QuantConfig
from sd35_fp8.quant.formats import dequantize_weight, quantize_weight
from sd35_fp8.quant.hardware import probe_device, rowwise_problem
from sd35_fp8.quant.linear import FP8Linear, auto_compute, scaled_linear
from sd35_fp8.quant.quantize import quantize

HAS_FP8_GPU = torch.cuda.is_available() and probe_device("cuda").fp8_matmul
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a CUDA GPU with FP8 tensor cores "
                                                   "(compute capability 8.9+); none here")]


def test_quantize_a_model_held_on_the_gpu():
    """The fix: every tensor the quantizer makes is made on the model's device (pos_embed's scale was made on the
    CPU: "Expected all tensors to be on the same device")."""
    from tools.tiny_sd35 import build_mmdit

    model = build_mmdit("large", device="cuda", dtype=torch.bfloat16).eval()
    for p in model.parameters():
        p.data.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.02)
    model.pos_embed.data.uniform_(-1, 1)
    q = quantize(model, QuantConfig(compute="weight_only"))[0]
    assert {t.device.type for t in q.state_dict().values()} == {"cuda"}
    assert any(isinstance(m, FP8Linear) for m in q.modules())


@pytest.mark.parametrize("path", ["weight_only", "fp8_matmul"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaling", ["per_channel", "per_tensor"])
def test_fp8_paths_match_dequantize_then_matmul_on_the_gpu(path, dtype, scaling):
    if path == "fp8_matmul" and rowwise_problem(torch.device("cuda"), dtype):
        pytest.skip(rowwise_problem(torch.device("cuda"), dtype))
    torch.manual_seed(0)
    w, b = torch.randn(1536, 1024, device="cuda") * 0.02, torch.randn(1536, device="cuda") * 0.01
    q, s = quantize_weight(w, scaling=scaling)
    x = torch.randn(2, 333, 1024, device="cuda").to(dtype)
    x[0, 7] *= 300  # an outlier token
    out = scaled_linear(x, q, s, b.to(dtype), path)
    reference = F.linear(x.double(), dequantize_weight(q, s, torch.float64), b.to(dtype).double())
    rel = float((out.double() - reference).norm() / reference.norm())
    assert out.dtype == dtype and out.shape == (2, 333, 1536)
    assert rel < (0.01 if path == "weight_only" else 0.03), rel


def test_auto_times_both_paths_on_this_device(monkeypatch):
    linear._auto_choice.clear()
    seconds = linear.time_paths(torch.device("cuda"), torch.bfloat16, 6144, 1536)
    print(f"6144x1536 bf16 (ms): { {k: 1e3 * v for k, v in seconds.items()} }")
    assert all(0 < v < 1 for v in seconds.values())
    choice = auto_compute("cuda", torch.bfloat16, 6144, 1536)
    monkeypatch.setattr(linear, "time_paths", lambda *a: pytest.fail("timed twice"))
    assert auto_compute("cuda", torch.bfloat16, 6144, 1536) == choice in ("fp8_matmul", "weight_only")


def test_stream_quantizing_onto_the_gpu_equals_the_cpu_bit_for_bit(tmp_path):
    """The loaders quantize on the GPU a model is headed to (`loaders.quantize_device`): the same bits and report as
    the CPU's quantizer, the model's tensors left on the GPU, everything else on the CPU."""
    from safetensors.torch import save_file

    from sd35_fp8.quant.streaming import quantize_safetensors_stream
    from tools.tiny_sd35 import build_mmdit

    model = build_mmdit("medium", device="cpu", dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    sd = {f"model.diffusion_model.{k}": (torch.randn(v.shape, generator=gen) * 0.02).to(v.dtype)
          for k, v in model.state_dict().items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3, generator=gen).half()
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    prefix = "model.diffusion_model."
    cpu, formats_c, report_c = quantize_safetensors_stream(path, QuantConfig(), model_prefix=prefix)
    gpu, formats_g, report_g = quantize_safetensors_stream(path, QuantConfig(), model_prefix=prefix, device="cuda")
    assert cpu.keys() == gpu.keys() and formats_c == formats_g and formats_c
    for key, tensor in gpu.items():
        assert tensor.device.type == ("cuda" if key.startswith(prefix) else "cpu"), key
        expected = cpu[key]
        assert tensor.dtype == expected.dtype and torch.equal(tensor.cpu().view(torch.uint8),
                                                              expected.view(torch.uint8)), key
    assert [r.name for r in report_g.layers] == [r.name for r in report_c.layers]
