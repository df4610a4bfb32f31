"""FP8 non-Linear tables (an SD3 MMDiT's `pos_embed`) inside ComfyUI models.

The engine stores `pos_embed` in FP8 with a scale of 1.0 (quant.formats.quantize_unit_scale), which
ComfyUI's MMDiT reads as it is: `forward` casts the cropped table to the activations' dtype
(`comfy.ops.cast_to_input`), as it does for its own fp8_e4m3fn weight dtype. What ComfyUI would do
wrong is *loading* it: `load_state_dict` copies into the 16/32-bit buffer the model was built with,
touching pages the size of the table in that dtype (450 MB in fp16 on Medium). While our loaders build
a model, a buffer-registration hook hands the model our FP8 tensor instead, so the copy is a no-op
(the same tensor) and the wide buffer is never allocated. Model detection still sees the table's
shape in the state dict, as it must. A clone (Quantize Model) gets the table as an object patch, so
the input model keeps its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..quant.formats import is_fp8
from ..quant.policy import UNIT_SCALE_TENSORS


@contextlib.contextmanager
def fp8_tables_in_place(sd: dict[str, torch.Tensor], model_prefix: str) -> Iterator[None]:
    """While ComfyUI builds a model from `sd`: a buffer registered under a table's name with the table's shape
    becomes the FP8 tensor from `sd` (keys `model_prefix` + name)."""
    tables = {name: sd[model_prefix + name] for name in UNIT_SCALE_TENSORS
              if model_prefix + name in sd and is_fp8(sd[model_prefix + name])}

    def hand_over(module: torch.nn.Module, name: str, buffer: torch.Tensor | None) -> torch.Tensor | None:
        table = tables.get(name)
        if table is None or buffer is None or buffer.device.type == "meta" or buffer.shape != table.shape:
            return None
        return table.to(buffer.device)

    handle = torch.nn.modules.module.register_module_buffer_registration_hook(hand_over) if tables else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()

