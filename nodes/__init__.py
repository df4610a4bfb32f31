"""ComfyUI adapters in ComfyUI's V3 schema (comfy_api v0_0_2, which both tested hosts ship): one file per concern,
each node a thin shell over quant/. Node ids, input names, defaults, option lists and output order are a public
contract (shared workflows name them; README, "Nodes")."""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .compare import SD35FP8CompareImages
from .hardware import SD35FP8HardwareInfo
from .loaders import SD35FP8CheckpointLoader, SD35FP8DiffusionModelLoader
from .quantize import SD35FP8QuantizeCLIP, SD35FP8QuantizeModel
from .sampling import SD35FP8Sampler
from .save import SD35FP8SaveModel

NODES: tuple[type[io.ComfyNode], ...] = (
    SD35FP8CheckpointLoader,
    SD35FP8DiffusionModelLoader,
    SD35FP8QuantizeModel,
    SD35FP8QuantizeCLIP,
    SD35FP8Sampler,
    SD35FP8HardwareInfo,
    SD35FP8CompareImages,
    SD35FP8SaveModel,
)


class SD35FP8Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SD35FP8Extension:
    return SD35FP8Extension()
