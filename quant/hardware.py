"""What a device can do with FP8, and which compute path `auto` picks.

Rules:
- FP8 tensor-core matmul: NVIDIA compute capability >= 8.9 (Ada, Hopper, Blackwell) and a
  torch with `torch._scaled_mm`. Ampere (8.0, 8.6) and Turing store FP8 but cannot multiply it.
- ROCm: FP8 matmul on gfx94x/gfx95x (MI300/MI350) with `torch._scaled_mm`; other AMD GPUs weight-only.
- MPS has no float8 dtype: weights are dequantized on the CPU side of the transfer (weight-only, 16-bit).
- CPU: weight-only.
Device properties are read through `_cuda_properties`, which tests replace to fake devices.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import COMPUTE_MODES, check_choice

FP8_MATMUL_MIN_CC = (8, 9)
ROCM_FP8_ARCHS = ("gfx94", "gfx95")


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
        return "fp8_matmul" if self.fp8_matmul else "weight_only"

    def to_text(self) -> str:
        cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else "n/a"
        return "\n".join([
            f"device: {self.device} ({self.name})",
            f"kind: {self.kind}",
            f"compute capability: {cc}",
            f"fp8 storage: {'yes' if self.fp8_storage else 'no'}",
            f"fp8 matmul: {'yes' if self.fp8_matmul else 'no'} ({self.reason})",
            f"memory: {self.memory_mb} MB",
            f"torch: {self.torch_version}, CUDA: {self.cuda_version or 'n/a'}",
            f"recommended compute: {self.recommended_compute}",
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
    else:
        ok, reason = True, f"compute capability {cc[0]}.{cc[1]} >= 8.9: FP8 tensor cores"
    return DeviceCapability(f"cuda:{index}", props.name, "cuda", cc, True, ok, memory, reason,
                            cuda_version=torch.version.cuda)


def resolve_compute(compute: str, device: str | torch.device) -> str:
    """`auto` -> fp8_matmul or weight_only for this device; an explicit fp8_matmul that cannot run is an error."""
    check_choice("compute", compute, COMPUTE_MODES)
    if compute == "weight_only":
        return compute
    cap = probe_device(device)
    if compute == "auto":
        return cap.recommended_compute
    if not cap.fp8_matmul:
        raise FP8MatmulUnsupported(f"compute: fp8_matmul cannot run on {cap.device} ({cap.name}): {cap.reason}. "
                                   "Use compute=auto or weight_only (FP8 storage, 16/32-bit math).")
    return compute
