"""ComfyUI adapters: one file per concern, each node a thin shell over quant/.

Display names come from each class's TITLE, so the id -> name table lives in one place.
"""

from .compare import SD35FP8CompareImages
from .hardware import SD35FP8HardwareInfo
from .loaders import SD35FP8CheckpointLoader, SD35FP8DiffusionModelLoader
from .quantize import SD35FP8QuantizeCLIP, SD35FP8QuantizeModel
from .sampling import SD35FP8Sampler
from .save import SD35FP8SaveModel

_NODES = (
    SD35FP8CheckpointLoader,
    SD35FP8DiffusionModelLoader,
    SD35FP8QuantizeModel,
    SD35FP8QuantizeCLIP,
    SD35FP8Sampler,
    SD35FP8HardwareInfo,
    SD35FP8CompareImages,
    SD35FP8SaveModel,
)

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.TITLE for cls in _NODES}
