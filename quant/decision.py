"""What happens to one tensor: the plan's actions, the one vocabulary of the engine and its report."""

from __future__ import annotations

from dataclasses import dataclass

FP8 = "fp8"  # quantized: FP8 weight + float32 scale
PROTECTED = "protected"  # a Linear weight kept 16-bit by a rule
UNIT_SCALE = "unit_scale"  # a non-Linear table (pos_embed) in FP8 with scale 1.0 where that is accurate enough
ALREADY_FP8 = "already_fp8"  # arrived in FP8 with its scale (a scaled FP8 file, a host's FP8 layer): passed through
WIDEN = "widen"  # a bare float8 tensor of an older scaled_fp8 file (a bias): widened to float16
KEPT = "kept"  # any other tensor of what is quantized (norms, biases, convs): stored as it is
COMPANION = "companion"  # a scale, marker or quantization entry, read with its weight: no output of its own
OUTSIDE = "outside"  # not part of what is quantized (VAE, text encoders not chosen): passed through, not reported

REPORTED = (FP8, PROTECTED, UNIT_SCALE, ALREADY_FP8, WIDEN, KEPT)  # the actions a report row can carry
STORED_FP8 = (FP8, UNIT_SCALE)  # the actions that store a tensor in FP8 made by this run


@dataclass(frozen=True)
class Decision:
    action: str
    rule: str  # why, in words: the preset glob, pattern line or policy that decided it
    layer: str  # the report's name: the layer (no `.weight`) for Linear weights, else the tensor's own name
    in_model: bool = False  # part of the diffusion model (its FP8 layers are listed in a saved file's metadata)
