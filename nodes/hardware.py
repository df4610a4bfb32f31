"""FP8 Hardware Capability: what this machine's device can do with FP8, and the compute mode to use."""

from __future__ import annotations

import comfy.model_management
import torch
from comfy_api.v0_0_2 import io

from ..quant.hardware import probe_device
from ..quant.linear import auto_compute
from .common import CATEGORY, PackNode

COMMON_LINEAR = (6144, 1536)  # (out, in) of SD3.5 Medium's MLP fc1: its most common Linear shape by FLOPs


def devices_present() -> list[str]:
    """auto (ComfyUI's device), then every device torch sees here."""
    found = ["auto", "cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


class SD35FP8HardwareInfo(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35FP8HardwareInfo",
            display_name="FP8 Hardware Capability",
            category=f"{CATEGORY}/utils",
            description="Reports the device, its compute capability, whether it can store FP8 and run FP8 tensor-core "
                        "matmul (NVIDIA compute capability 8.9+: Ada, Hopper, Blackwell), its memory, and the compute "
                        "mode the FP8 loaders will pick with compute=auto.",
            inputs=[io.Combo.Input("device", options=devices_present(), default="auto", optional=True,
                                   tooltip="auto (ComfyUI's device), or one of the devices present: cpu, cuda:N "
                                           "for a specific GPU, mps.")],
            outputs=[
                io.String.Output(display_name="report", tooltip="Human-readable capability report."),
                io.Boolean.Output(display_name="fp8_matmul_supported",
                                  tooltip="True where FP8 tensor-core matmul can run."),
                io.String.Output(display_name="recommended_compute",
                                 tooltip="fp8_matmul or weight_only: what compute=auto will use for SD3.5's most "
                                         "common Linear layer in float16 (fp8_matmul only where it is timed "
                                         "faster on this device)."),
                io.Int.Output(display_name="memory_mb", tooltip="Device memory in MiB (2^20 bytes)."),
            ],
        )

    @classmethod
    def execute(cls, device="auto") -> io.NodeOutput:
        device = device.strip()
        if device == "auto":
            device = str(comfy.model_management.get_torch_device())
        cap = probe_device(device)
        auto = auto_compute(device, torch.float16, *COMMON_LINEAR)  # weight_only where cap has no FP8 matmul
        return io.NodeOutput(cap.to_text(), cap.fp8_matmul, auto, int(cap.memory_mb))
