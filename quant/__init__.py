"""The FP8 engine: pure PyTorch + safetensors. Never imports comfy.

Public API (keyword arguments, one verb each):
    quantize(module, QuantConfig(...)) -> (module, Report)
    quantize_weight / dequantize_weight            (quant.formats)
    FP8Linear                                      (quant.linear)
    probe_device / resolve_compute                 (quant.hardware)
    resolve_policy / detect_variant                (quant.policy)
    quantize_safetensors_stream                    (quant.streaming)
    save_quantized / load_quantized                (quant.checkpoint)
"""

from .config import QuantConfig
from .formats import dequantize_weight, quantize_weight

__all__ = ["QuantConfig", "dequantize_weight", "quantize_weight"]
