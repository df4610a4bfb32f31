"""Input definitions and helpers shared by several nodes (one definition per input name).

Input names are a public contract (shared workflows name them): see the README, "Nodes".
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_management
import comfy.utils
from comfy_api.v0_0_2 import io

from ..quant.config import COMPUTE_MODES, PRESETS
from ..quant.formats import FP8_DTYPES, SCALINGS
from ..quant.report import Report

CATEGORY = "SD3.5 FP8"
PACK_VERSION = "0.1.0"
INFO_KEY = "sd35_fp8"  # model_options entry where loaders/quantizers record what they did (copied on clone)
# The loaders' fourth compute choice: build the model with ComfyUI's own FP8 layers (nodes/native.py)
COMFYUI_NATIVE = "comfyui_native"


class PackNode(io.ComfyNode):
    """A V3 node that keeps ComfyUI 0.3.75's combo validation: there, its V1 view (INPUT_TYPES, what the validator
    reads) lists each combo's choices the V1 way, since V3's own form ("COMBO" + "options") passes that validator
    unchecked and a model name outside the list would reach the node. On hosts that check V3 combos it is left
    as it is (they need the V3 form). The frontend gets the V3 form either way (object_info comes from the schema).
    """

    @classmethod
    def INPUT_TYPES(cls, *args, **kwargs):  # noqa: N802 - ComfyUI's name
        from comfy_api.latest import _io

        result = super().INPUT_TYPES(*args, **kwargs)
        # Hosts that parse V3 inputs while validating a prompt (ComfyUI 0.8.0: `get_finalized_class_inputs`) also
        # check V3 combo values. Older ones (0.3.75) check a combo only when INPUT_TYPES lists its choices.
        if hasattr(_io, "get_finalized_class_inputs"):
            return result
        spec = result[0] if isinstance(result, tuple) else result
        for group in ("required", "optional"):
            for name, definition in list((spec.get(group) or {}).items()):
                if definition[0] == "COMBO" and "options" in definition[1]:
                    options = dict(definition[1])
                    spec[group][name] = (list(options.pop("options")), options)
        return result


def record_info(model, source: str, report: Report) -> None:
    """Note on a (new or cloned) ModelPatcher how it was made: for the save node's metadata, and the report as data
    (`Report.to_dict()`) for whoever reads the model: the STRING output is its text."""
    model.model_options[INFO_KEY] = {"source": source, "rule": report.rule, "fp8_format": report.fp8_format,
                                     "scaling": report.scaling, "report": report.to_dict()}


def fp8_format_input(with_disabled: bool = False) -> io.Combo.Input:
    disabled = ["disabled"] if with_disabled else []
    return io.Combo.Input("fp8_format", options=[*FP8_DTYPES, *disabled], default="float8_e4m3fn",
                          tooltip="FP8 storage format. e4m3fn (default): more precision, range +-448 before scaling. "
                                  "e5m2: more range, less precision; rarely better for weights."
                                  + (" disabled: load the model as stored (no FP8)." if with_disabled else ""))


def scaling_input() -> io.Combo.Input:
    return io.Combo.Input("scaling", options=list(SCALINGS), default="per_channel",
                          tooltip="per_channel (default): one float32 scale per output row, lowest error. "
                                  "per_tensor: one scale per layer, what older FP8 files use.")


def protect_patterns_input() -> io.String.Input:
    return io.String.Input("protect_patterns", multiline=True, default="", optional=True,
                           tooltip="Extra modules to keep in 16-bit, one per line, matched against ComfyUI key names "
                                   "(e.g. joint_blocks.12.x_block.mlp.fc1). Glob (final_layer.*) or re: regex "
                                   "(re:joint_blocks\\.(0|1)\\.). Lines starting with # are comments.")


def quant_inputs(with_disabled: bool = False, loader: bool = False) -> list[io.Input]:
    """The engine inputs every quantizing node shares, in contract order (`loader`: the loaders' extra compute
    choice, comfyui_native)."""
    native = [COMFYUI_NATIVE] if loader else []
    native_tip = (" comfyui_native: build the model with ComfyUI's own FP8 layers (its mixed-precision ops, "
                  "comfy-kitchen's kernels on 0.8 GPUs); this pack still decides which layers are FP8 and reports "
                  "the error. Needs scaling=per_tensor and float8_e4m3fn.") if loader else ""
    return [
        fp8_format_input(with_disabled),
        scaling_input(),
        io.Combo.Input("protect_preset", options=list(PRESETS), default="auto",
                       tooltip="Which modules stay in 16-bit. auto detects SD3.5 Large / Medium / Large Turbo from "
                               "the weights (and uses a generic embedders/first/last rule on other models); none "
                               "quantizes every Linear."),
        io.Combo.Input("compute", options=[*COMPUTE_MODES, *native], default="auto",
                       tooltip="auto: FP8 tensor-core matmul where the GPU has it (NVIDIA compute capability 8.9+) "
                               "and a one-time timing there finds it faster, else weight_only. weight_only: FP8 "
                               "storage, 16/32-bit math (works everywhere). "
                               "fp8_matmul: require FP8 tensor cores (an error where the device or torch has "
                               "none); a layer they cannot take (e5m2, sizes not multiples of 16) runs weight_only, "
                               "said once in the log." + native_tip),
    ]


def progress_callback() -> Callable[[int, int], None]:
    """A (done, total) callback for a per-tensor loop: ComfyUI's progress bar, and its interrupt (Cancel) honoured
    between tensors."""
    bar = comfy.utils.ProgressBar(1)

    def update(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, max(total, 1))

    return update
