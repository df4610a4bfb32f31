"""What a device can do with FP8, and which compute path `auto` picks.

Rules:
- FP8 tensor-core matmul: NVIDIA compute capability >= 8.9 (Ada, Hopper, Blackwell) and a
  torch with `torch._scaled_mm`. Ampere (8.0, 8.6) and Turing store FP8 but cannot multiply it.
- ROCm: FP8 matmul on gfx94x/gfx95x (MI300/MI350) with `torch._scaled_mm`; other AMD GPUs weight-only.
- MPS has no float8 dtype: weights are dequantized on the CPU side of the transfer (weight-only, 16-bit).
- CPU: weight-only.
- fp8_matmul uses row-wise scales (one per token, one per output channel): CUDA `torch._scaled_mm` takes them from
  torch 2.5, with a bfloat16 output everywhere (CUTLASS) and a float16/float32 output only on compute capability 9.x
  with CUDA >= 12.9 (cuBLASLt); ROCm bfloat16 only; torch's CPU `_scaled_mm` takes them from torch 2.14 (before:
  tensor-wise scales only). `rowwise_problem` says which of these a device and dtype miss.
compute=auto's choice between the two paths where both can run is timed per device (quant.linear.auto_compute).
Device properties are read through `_cuda_properties`, which tests replace to fake devices.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.torch_version import TorchVersion

from .config import COMPUTE_MODES, check_choice

FP8_MATMUL_MIN_CC = (8, 9)
ROCM_FP8_ARCHS = ("gfx94", "gfx95")
ROWWISE_MIN_TORCH = {"cuda": "2.5", "cpu": "2.14"}  # first torch whose _scaled_mm takes row-wise scales there
ROWWISE_ANY_DTYPE_CUDA = "12.9"  # cuBLASLt's row-wise scaling (16/32-bit outputs besides bfloat16), on 9.x only
TORCH_VERSION = TorchVersion(torch.__version__)


class FP8MatmulUnsupported(RuntimeError):
    """compute=fp8_matmul asked for on a device without FP8 tensor cores."""


@dataclass(frozen=True)
class DeviceCapability:
    device: str
    name: str
    kind: str  # cuda | rocm | mps | cpu
    compute_capability: tuple[int, int] | None
    fp8_storage: bool
    fp8_matmul: bool
    memory_mb: int
    reason: str  # why fp8_matmul is or is not available
    torch_version: str = torch.__version__
    cuda_version: str | None = None

    @property
    def recommended_compute(self) -> str:
        """The path compute=auto considers here: weight_only, or fp8_matmul, which auto then takes only where a
        one-time timing on the device finds it faster (quant.linear.auto_compute)."""
        return "fp8_matmul" if self.fp8_matmul else "weight_only"

    def to_text(self) -> str:
        cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else "n/a"
        return "\n".join([
            f"device: {self.device} ({self.name})",
            f"kind: {self.kind}",
            f"compute capability: {cc}",
            f"fp8 storage: {'yes' if self.fp8_storage else 'no'}",
            f"fp8 matmul: {'yes' if self.fp8_matmul else 'no'} ({self.reason})",
            f"memory: {self.memory_mb} MiB",
            f"torch: {self.torch_version}, CUDA: {self.cuda_version or 'n/a'}",
            f"compute=auto considers: {self.recommended_compute}"
            + (" (taken where timed faster than weight_only)" if self.fp8_matmul else ""),
        ])


@dataclass(frozen=True)
class _CudaProps:
    name: str
    major: int
    minor: int
    total_memory: int
    gcn_arch_name: str = ""


def _cuda_properties(index: int) -> _CudaProps:
    props = torch.cuda.get_device_properties(index)
    return _CudaProps(props.name, props.major, props.minor, props.total_memory, getattr(props, "gcn_arch_name", ""))


def _is_rocm() -> bool:
    return torch.version.hip is not None


def _has_scaled_mm() -> bool:
    return hasattr(torch, "_scaled_mm")


def host_memory(field: str = "MemTotal") -> int:
    """Bytes of this machine's RAM as /proc/meminfo's `field` (MemTotal, MemAvailable) says; 0 where it has none."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def probe_device(device: str | torch.device = "cpu") -> DeviceCapability:
    """Capabilities of `device` ("cpu", "mps", "cuda", "cuda:N")."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return DeviceCapability("cpu", "CPU", "cpu", None, True, False, host_memory() >> 20,
                                "CPUs have no FP8 matmul; weights are dequantized per layer")
    if dev.type == "mps":
        return DeviceCapability("mps", "Apple GPU", "mps", None, False, False, host_memory() >> 20,
                                "MPS has no float8 dtype; FP8 weights are dequantized to 16-bit before transfer")
    if dev.type != "cuda":
        raise ValueError(f"device: {str(device)!r} is not supported; use auto, cpu, mps or cuda:N")
    index = dev.index if dev.index is not None else 0
    props = _cuda_properties(index)
    cc = (props.major, props.minor)
    memory = props.total_memory // (1024 * 1024)
    if _is_rocm():
        arch = props.gcn_arch_name
        ok = arch.startswith(ROCM_FP8_ARCHS) and _has_scaled_mm()
        reason = f"ROCm {arch or 'unknown arch'}: " + ("FP8 matmul supported" if ok else
                                                        "FP8 matmul needs gfx94x/gfx95x (MI300+)")
        return DeviceCapability(f"cuda:{index}", props.name, "rocm", cc, True, ok, memory, reason,
                                cuda_version=torch.version.hip)
    if cc < FP8_MATMUL_MIN_CC:
        ok, reason = False, f"compute capability {cc[0]}.{cc[1]} < 8.9: FP8 storage only (Ampere and older)"
    elif not _has_scaled_mm():
        ok, reason = False, "this torch has no torch._scaled_mm"
    elif TORCH_VERSION < ROWWISE_MIN_TORCH["cuda"]:
        ok, reason = False, f"torch {TORCH_VERSION}: row-wise FP8 matmul needs torch >= {ROWWISE_MIN_TORCH['cuda']}"
    else:
        ok, reason = True, f"compute capability {cc[0]}.{cc[1]} >= 8.9: FP8 tensor cores"
    return DeviceCapability(f"cuda:{index}", props.name, "cuda", cc, True, ok, memory, reason,
                            cuda_version=torch.version.cuda)


def resolve_compute(compute: str, device: str | torch.device) -> str:
    """`auto` -> weight_only where the device cannot run fp8_matmul, else fp8_matmul as the candidate that
    quant.linear.auto_compute times against weight_only; an explicit fp8_matmul that cannot run is an error."""
    check_choice("compute", compute, COMPUTE_MODES)
    if compute == "weight_only":
        return compute
    cap = probe_device(device)
    if compute == "auto":
        return "fp8_matmul" if cap.fp8_matmul else "weight_only"  # a candidate: quant.linear.auto_compute times it
    if not cap.fp8_matmul:
        raise FP8MatmulUnsupported(f"compute: fp8_matmul cannot run on {cap.device} ({cap.name}): {cap.reason}. "
                                   "Use compute=auto or weight_only (FP8 storage, 16/32-bit math).")
    return compute


_rowwise_cache: dict[tuple[str, torch.dtype], str | None] = {}


def rowwise_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `torch._scaled_mm` with row-wise scales cannot give a `dtype` output on `device` with this torch (None if
    it can). Cached per device and dtype: it runs on every fp8_matmul forward."""
    key = (str(device), dtype)
    if key not in _rowwise_cache:
        _rowwise_cache[key] = _rowwise_problem(torch.device(device), dtype)
    return _rowwise_cache[key]


def _rowwise_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type == "cpu":
        need = ROWWISE_MIN_TORCH["cpu"]
        return None if TORCH_VERSION >= need else (f"torch {TORCH_VERSION}'s CPU _scaled_mm takes tensor-wise scales "
                                                    f"only (row-wise: torch >= {need})")
    if device.type != "cuda":
        return f"{device.type} has no FP8 matmul"
    if TORCH_VERSION < ROWWISE_MIN_TORCH["cuda"]:
        return f"torch {TORCH_VERSION}: row-wise FP8 matmul needs torch >= {ROWWISE_MIN_TORCH['cuda']}"
    if dtype == torch.bfloat16:
        return None
    props = _cuda_properties(device.index if device.index is not None else 0)
    cuda = TorchVersion(torch.version.cuda or "0")
    if not _is_rocm() and props.major == 9 and cuda >= ROWWISE_ANY_DTYPE_CUDA:
        return None
    return (f"row-wise FP8 matmul gives {dtype} output only on compute capability 9.x with CUDA >= "
            f"{ROWWISE_ANY_DTYPE_CUDA} (here {props.major}.{props.minor}, {'ROCm' if _is_rocm() else 'CUDA'} "
            f"{torch.version.hip or torch.version.cuda}): bfloat16 elsewhere")
