"""The FP8 engine: pure PyTorch + safetensors. Never imports comfy.

Public API (keyword arguments, one verb each):
    quantize(module, QuantConfig(...)) -> (module, Report)
    quantize_weight / dequantize_weight            (quant.formats)
    FP8Linear                                      (quant.linear)
    probe_device / resolve_compute                 (quant.hardware)
    resolve_policy / detect_variant                (quant.policy)
    quantize_safetensors_stream                    (quant.streaming)
    save_quantized                                 (quant.checkpoint)
"""

from .checkpoint import save_quantized
from .config import QuantConfig
from .formats import dequantize_weight, quantize_weight
from .hardware import probe_device, resolve_compute
from .linear import FP8Linear
from .policy import detect_variant, resolve_policy
from .quantize import quantize
from .report import Report
from .streaming import quantize_safetensors_stream, quantize_state_dict

__all__ = [
    "FP8Linear", "QuantConfig", "Report", "dequantize_weight", "detect_variant", "probe_device",
    "quantize", "quantize_safetensors_stream", "quantize_state_dict", "quantize_weight", "resolve_compute",
    "resolve_policy", "save_quantized",
]
