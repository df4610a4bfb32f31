"""Input definitions and helpers shared by several nodes (one definition per input name).

Input names are a public contract (shared workflows name them): see the README, "Nodes".
"""

from __future__ import annotations

from ..quant.config import COMPUTE_MODES, PRESETS

CATEGORY = "SD3.5 FP8"
PACK_VERSION = "0.1.0"
INFO_KEY = "sd35_fp8"  # model_options entry where loaders/quantizers record what they did (copied on clone)


def record_info(model, source: str, rule: str, fp8_format: str, scaling: str) -> None:
    """Note on a (new or cloned) ModelPatcher how it was made, for the save node's metadata."""
    model.model_options[INFO_KEY] = {"source": source, "rule": rule, "fp8_format": fp8_format, "scaling": scaling}

FP8_FORMAT = (["float8_e4m3fn", "float8_e5m2"], {
    "default": "float8_e4m3fn",
    "tooltip": "FP8 storage format. e4m3fn (default): more precision, range +-448 before scaling. "
               "e5m2: more range, less precision; rarely better for weights.",
})
FP8_FORMAT_OR_DISABLED = ([*FP8_FORMAT[0], "disabled"], {
    **FP8_FORMAT[1],
    "tooltip": FP8_FORMAT[1]["tooltip"] + " disabled: load the model as stored (no FP8).",
})
SCALING = (["per_channel", "per_tensor"], {
    "default": "per_channel",
    "tooltip": "per_channel (default): one float32 scale per output row, lowest error. "
               "per_tensor: one scale per layer, what older FP8 files use.",
})
PROTECT_PRESET = (list(PRESETS), {
    "default": "auto",
    "tooltip": "Which modules stay in 16-bit. auto detects SD3.5 Large / Medium / Large Turbo from the weights "
               "(and uses a generic embedders/first/last rule on other models); none quantizes every Linear.",
})
COMPUTE = (list(COMPUTE_MODES), {
    "default": "auto",
    "tooltip": "auto: FP8 tensor-core matmul where the GPU has it (NVIDIA compute capability 8.9+), "
               "else weight_only. weight_only: FP8 storage, 16/32-bit math (works everywhere). "
               "fp8_matmul: require FP8 tensor cores; an error on GPUs without them.",
})
PROTECT_PATTERNS = ("STRING", {
    "multiline": True,
    "default": "",
    "tooltip": "Extra modules to keep in 16-bit, one per line, matched against ComfyUI key names "
               "(e.g. joint_blocks.12.x_block.mlp.fc1). Glob (final_layer.*) or re: regex "
               "(re:joint_blocks\\.(0|1)\\.). "
               "Lines starting with # are comments.",
})


def quant_inputs(format_choice=FP8_FORMAT) -> dict:
    """The engine inputs every quantizing node shares, in contract order."""
    return {
        "fp8_format": format_choice,
        "scaling": SCALING,
        "protect_preset": PROTECT_PRESET,
        "compute": COMPUTE,
    }
