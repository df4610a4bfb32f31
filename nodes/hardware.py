"""FP8 Hardware Capability: what this machine's device can do with FP8, and the compute mode to use."""

from __future__ import annotations

from ..quant.hardware import probe_device
from .common import CATEGORY


class SD35FP8HardwareInfo:
    TITLE = "FP8 Hardware Capability"
    CATEGORY = f"{CATEGORY}/utils"
    DESCRIPTION = ("Reports the device, its compute capability, whether it can store FP8 and run FP8 tensor-core "
                   "matmul (NVIDIA compute capability 8.9+: Ada, Hopper, Blackwell), its memory, and the compute "
                   "mode the FP8 loaders will pick with compute=auto.")
    RETURN_TYPES = ("STRING", "BOOLEAN", "STRING", "INT")
    RETURN_NAMES = ("report", "fp8_matmul_supported", "recommended_compute", "memory_mb")
    OUTPUT_TOOLTIPS = ("Human-readable capability report.", "True where FP8 tensor-core matmul can run.",
                       "fp8_matmul or weight_only: what compute=auto will use.", "Device memory in MB.")
    FUNCTION = "probe"

    @classmethod
    def INPUT_TYPES(cls):
        return {"optional": {"device": ("STRING", {
            "default": "auto",
            "tooltip": "auto (ComfyUI's device), cpu, mps, or cuda:N for a specific GPU.",
        })}}

    def probe(self, device="auto"):
        if device.strip() == "auto":
            import comfy.model_management

            device = str(comfy.model_management.get_torch_device())
        cap = probe_device(device.strip())
        return (cap.to_text(), cap.fp8_matmul, cap.recommended_compute, int(cap.memory_mb))
