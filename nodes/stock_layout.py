"""What this pack's FP8 layers write when a generic save node writes the model to a file: a layout the host that
writes the file reads back right.

ComfyUI's save nodes (ModelSave, CheckpointSave, CLIPSave; community ones such as KJNodes' ModelSaveKJ) write the
state dict the model gives them. Our FP8 Linear's own state dict (`weight` in float8 + `weight_scale`) names no
layout a stock loader knows: it would read the float8 weight with no scale at all, a silently wrong model (issue 29).
So while such a save is under way, each FP8 layer writes instead:

- ComfyUI 0.8+, diffusion model: ComfyUI's own per-layer quantization entry, as its mixed-precision Linear writes it
  (comfy/ops.py `mixed_precision_ops`: `<layer>.comfy_quant`, a uint8 tensor holding JSON {"format": ...}, beside
  `<layer>.weight` float8 and `<layer>.weight_scale` float32). Its loaders detect the entries in the state dict
  (comfy.utils.detect_layer_quantization: UNETLoader, CheckpointLoaderSimple) and run the layers on their
  mixed-precision ops; this pack's loaders read them too (quant.streaming). Its FP8 layout holds one scale per
  layer, in float8_e4m3fn (a per-channel [out, 1] scale is not in it on every build): a per-tensor e4m3 layer keeps
  its bits; a per-channel (or e5m2) one is re-rounded to it, one more FP8 rounding, as Save FP8 Model's
  stock_compatible layout does; one a save merged a patch into (a LoRA: rounded into FP8 by that merge already) is
  written 16-bit instead of being rounded a second time. Marked for 16-bit matmul like the pack's own files
  (quant.checkpoint.LAYER_MARKING): ComfyUI would otherwise run it FP8 x FP8 on FP8 GPUs, unscaled input.
- ComfyUI 0.3.75, and the text encoders on any host: the weight dequantized, in the model's own dtype (the one its
  16-bit layers have: float32 where the model runs in float32, as on a CPU). 0.3.75 reads per-layer FP8 only from a
  file's header metadata (`_quantization_metadata`), which a save node writes from its own arguments, never from
  the state dict; its other layout, the legacy `scaled_fp8` marker, builds every Linear of the model in float8
  (comfy/ops.py `scaled_fp8_ops`): protected layers and biases would be cast without a scale. ComfyUI 0.8 looks for
  quantization entries in SD3's T5-XXL only (text_encoders/sd3_clip.py t5_xxl_detect), not in CLIP-L/G.

A save is told from the other readers of a state dict (ModelPatcher's key patches and LoRA key maps, model merging;
Save FP8 Model reads the layers themselves) by the call it runs inside: the model's `state_dict_for_saving` (every
save of a diffusion model, stock or community) or CLIP.get_sd (a save of the text encoders). Outside them the state
dict is the layer as it is. Each save says once in the log what it wrote, and why.
"""

from __future__ import annotations

import json
import logging
import sys
import weakref
from collections import Counter

import comfy.sd
import torch

from ..quant.checkpoint import LAYER_MARKING, STOCK_FORMAT
from ..quant.formats import FP8_DTYPES, dequantize_weight, format_name, quantize_weight
from .host_fp8 import OWN_SCALE
from .native import host_runs_native

log = logging.getLogger(__name__)

DIFFUSION_MODEL, TEXT_ENCODERS = "the diffusion model", "the text encoders"
# The forms a layer is written in, in the order the log names them.
KEPT, REROUNDED, MERGED, WIDENED = "kept", "re-rounded", "merged, 16-bit", "16-bit"

_FLOAT8 = frozenset(FP8_DTYPES.values())
_tallies: dict[int, tuple[str, Counter]] = {}  # id(state dict being written) -> (what, {form: layers})


def saving() -> str | None:
    """DIFFUSION_MODEL or TEXT_ENCODERS while a save node reads that part's state dict to write a file, else None."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "state_dict_for_saving":  # BaseModel's, or a model class's override of it
            return DIFFUSION_MODEL
        if code.co_name == "get_sd" and code.co_filename == comfy.sd.__file__:  # CLIP's (VAE's holds no layer of ours)
            return TEXT_ENCODERS
        frame = frame.f_back
    return None


def write_for_file(layer: torch.nn.Module, destination: dict, prefix: str) -> None:
    """Rewrite the FP8 layer `layer` has just written to `destination` (`<prefix>weight`, `<prefix>weight_scale`:
    what `saved_weight()` returned) in the layout the host reads, when a save node is writing a file; otherwise
    leave it as it is."""
    part = saving()
    if part is None:
        return
    weight, scale = destination[prefix + "weight"], destination.pop(prefix + "weight_scale")
    form = WIDENED
    if part == DIFFUSION_MODEL and host_runs_native():
        form = KEPT if format_name(weight.dtype) == STOCK_FORMAT and scale.numel() == 1 else \
            MERGED if _merged(layer) else REROUNDED
    if form == REROUNDED:
        real = dequantize_weight(weight, scale.to(weight.device), torch.float32)
        weight, scale = quantize_weight(real, STOCK_FORMAT, "per_tensor", name=prefix + "weight")
    if form in (KEPT, REROUNDED):
        destination[prefix + "weight"] = weight
        destination[prefix + "weight_scale"] = scale.float().reshape(())
        entry = json.dumps({"format": STOCK_FORMAT, **LAYER_MARKING}).encode("utf-8")
        destination[prefix + "comfy_quant"] = torch.tensor(list(entry), dtype=torch.uint8)
    else:
        # on the CPU: the file is written from there, and a whole model's 16-bit copy would not fit beside the
        # FP8 one on every GPU
        destination[prefix + "weight"] = dequantize_weight(weight.cpu(), scale.cpu(), torch.float32) \
            .to(_model_dtype(layer))
    _tally(destination, part, form)


def _merged(layer: torch.nn.Module) -> bool:
    """Whether the weight the layer saves has a patch (a LoRA) merged into it, so was rounded into FP8 once more
    than the model runs it (nodes/runtime_patches.py): re-rounding it would be a second time."""
    return getattr(layer.weight, OWN_SCALE, None) is not None or bool(getattr(layer, "runtime_patches", None))


def _model_dtype(layer: torch.nn.Module) -> torch.dtype:
    """The dtype the model's 16-bit layers have: the one ComfyUI built the layer with, else its bias's (float16 for
    none, or a float8 model dtype: never the float8 a host may pick for a mostly-FP8 model)."""
    for dtype in (getattr(layer, "target_dtype", None), getattr(layer.bias, "dtype", None)):
        if dtype is not None and dtype.is_floating_point and dtype not in _FLOAT8:
            return dtype
    return torch.float16


def _tally(destination: dict, part: str, form: str) -> None:
    """Count one layer of the state dict being written; the count is logged once, when that state dict is done
    with (the file written)."""
    key = id(destination)
    if key not in _tallies:
        try:
            weakref.finalize(destination, _report, key)
        except TypeError:  # a plain dict (torch's own state dicts take weak references): say it for this layer
            _log(part, Counter({form: 1}))
            return
        _tallies[key] = (part, Counter())
    _tallies[key][1][form] += 1


def _report(key: int) -> None:
    part, counts = _tallies.pop(key)
    _log(part, counts)


def _log(part: str, counts: Counter) -> None:
    version = "0.8+" if host_runs_native() else "before 0.8"
    said = []
    if counts[KEPT]:
        said.append(f"{counts[KEPT]} in ComfyUI's per-layer FP8 layout (a comfy_quant entry and one "
                    f"{STOCK_FORMAT} scale per layer), bits unchanged")
    if counts[REROUNDED]:
        said.append(f"{counts[REROUNDED]} re-rounded to one {STOCK_FORMAT} scale per layer, the FP8 layout ComfyUI "
                    f"{version} reads (per-channel or float8_e5m2 scales are not in it): one more FP8 rounding; a "
                    "model loaded with scaling=per_tensor and float8_e4m3fn saves with its bits unchanged")
    if counts[MERGED]:
        said.append(f"{counts[MERGED]} dequantized to 16-bit, at 16-bit size in the file (a patch such as a LoRA was "
                    "merged into them, rounding them into FP8 once already; re-rounding them to one scale per layer "
                    "would be a second time)")
    if counts[WIDENED]:
        why = ("ComfyUI does not read FP8 scales in every text encoder's file" if part == TEXT_ENCODERS else
               f"ComfyUI {version} reads scaled FP8 layers only from a file's header, which a save node does not "
               "write from the model, and its legacy scaled_fp8 marker would cast the 16-bit layers and biases to "
               "float8; Save FP8 Model writes the diffusion model in FP8 in a layout it reads")
        said.append(f"{counts[WIDENED]} dequantized to 16-bit, at 16-bit size in the file ({why})")
    level = logging.INFO if counts[KEPT] == sum(counts.values()) else logging.WARNING
    log.log(level, "SD3.5 FP8: a save node wrote %s's %d FP8 layer(s) in a layout this ComfyUI loads back right: %s.",
            part, sum(counts.values()), "; ".join(said))
