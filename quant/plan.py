"""The plan: what happens to each tensor of a model, decided once, and the one step that carries it out.

A plan is made from the tensors' names, shapes and dtypes plus a QuantConfig, before any weight is read, so a
file's header, an in-memory state dict, a torch module and a ComfyUI model are planned alike. Every rule lives
here or in policy.py (presets, patterns, variant detection); the drivers (streaming.py for files and state
dicts, quantize.py for torch modules, the pack's nodes/patching.py for ComfyUI models) only walk their tensors,
call `apply` and store what it returns. A report column is added in report.py and filled in `apply`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from .budget import fit_budget
from .checkpoint import LEGACY_MARKER
from .config import QuantConfig, check_choice
from .formats import FP8_DTYPES, quantize_unit_scale, quantize_weight_with_error
from .policy import ProtectionPolicy, resolve_policy
from .report import LayerReport, Report

FP8 = "fp8"  # quantized: FP8 weight + float32 scale
PROTECTED = "protected"  # a Linear weight kept 16-bit by a rule
UNIT_SCALE = "unit_scale"  # a non-Linear table (pos_embed) in FP8 with scale 1.0 where that is accurate enough
HELD = "held_fp8"  # arrived in FP8 with its scale (a scaled FP8 file, a host's FP8 layer): passed through
WIDEN = "widen"  # a bare float8 tensor of an older scaled_fp8 file (a bias): widened to float16
KEPT = "kept"  # any other tensor of what is quantized (norms, biases, convs): stored as it is
COMPANION = "companion"  # a scale, marker or quantization entry, read with its weight: no output of its own
OUTSIDE = "outside"  # not part of what is quantized (VAE, text encoders not chosen): passed through, not reported

# A layer's scales (ours, ComfyUI's mixed-precision and legacy names) and the per-file markers.
WEIGHT_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
SCALE_SUFFIXES = (*WEIGHT_SCALE_SUFFIXES, ".input_scale", ".scale_input")
QUANT_ENTRY_SUFFIX = ".comfy_quant"  # ComfyUI 0.8.0's per-layer quantization entry (JSON in a uint8 tensor)

# SD3.5's text encoders, the node options that choose them, and their 2-D weights that stay 16-bit (embedding
# tables and CLIP's projection: not matmuls, or too sensitive for the memory they hold).
TEXT_ENCODERS = ("t5xxl", "clip_g", "clip_l")
LOADER_TEXT_ENCODER_CHOICES = {"t5xxl_only": ("t5xxl",), "none": (), "all": TEXT_ENCODERS}  # text_encoder_fp8
CLIP_NODE_ENCODER_CHOICES = {"t5xxl": ("t5xxl",), "t5xxl_and_clip_g": ("t5xxl", "clip_g"), "all": TEXT_ENCODERS}
TEXT_ENCODER_KEEP = ("embed", "shared", "relative_attention_bias", "text_projection", "position")
CHECKPOINT_TEXT_ENCODER_PREFIX = "text_encoders."  # SD3.5 all-in-one checkpoints: text_encoders.<name>.
CHECKPOINT_MODEL_PREFIX = "model.diffusion_model."  # and their diffusion model's keys


class UnsupportedQuantFormat(ValueError):
    """A layer stored in a quantized format other than scaled FP8 (nvfp4, mxfp8, int8, ...)."""


@dataclass(frozen=True)
class Decision:
    action: str
    rule: str  # why, in words: the preset glob, pattern line or policy that decided it
    layer: str  # the report's name: the layer (no `.weight`) for Linear weights, else the tensor's own name
    in_model: bool = False  # part of the diffusion model (its FP8 layers are listed in a saved file's metadata)


def choose_encoders(option: str, value: str, choices: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    check_choice(option, value, choices)
    return choices[value]


@dataclass
class Plan:
    config: QuantConfig
    policy: ProtectionPolicy
    decisions: dict[str, Decision]

    def __getitem__(self, key: str) -> Decision:
        return self.decisions[key]

    def keys(self, action: str) -> list[str]:
        return [k for k, d in self.decisions.items() if d.action == action]

    def new_report(self, rule: str | None = None) -> Report:
        return Report(rule=self.policy.rule if rule is None else rule, warnings=list(self.policy.warnings),
                      fp8_format=self.config.fp8_format, scaling=self.config.scaling, backend=self.config.backend)

    def finish(self, report: Report, store: Callable[[str, Decision], None] | None = None,
               source: Callable[[str], torch.Tensor] | None = None, itemsize: int | None = None) -> Report:
        """The report of a finished pass, with its closing warning. With a memory budget and `store`: first fit the
        budget (quant.budget.fit_budget: `source`, `itemsize`) and `store` each tensor whose decision it changes."""
        if store is not None and self.config.memory_budget is not None:
            for key, decision in fit_budget(self, report, self.config.memory_budget, source, itemsize).items():
                store(key, decision)
        if report.n_already_fp8:
            report.warnings.append(f"the input already holds {report.n_already_fp8} FP8 layer(s): they were kept "
                                   "as they are")
        elif report.n_fp8 == 0 and report.budget is not None:
            report.warnings.append("the memory budget holds the whole model in 16-bit: no layer was quantized")
        elif report.n_fp8 == 0:
            report.warnings.append("no layer was quantized: check protect_preset / protect_patterns")
        return report


def make_plan(config: QuantConfig, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype], *,
              model_prefix: str | None = "", text_encoders: Mapping[str, str] | None = None,
              linears: Collection[str] | None = None, hint: str = "", policy: ProtectionPolicy | None = None) -> Plan:
    """Decide every key of `shapes`.

    `model_prefix`: the diffusion model's keys (None: there is none, e.g. a CLIP). `text_encoders`: {encoder:
    key prefix} of the chosen encoders. `linears`: the names of the Linear layers where the source knows them (a
    module); a file's are its 2-D `.weight` keys. `dtypes` may mark a layer float8 that arrives in a host's own
    quantized tensor type. `policy`: a ready protection policy for the model (the benchmark's per-group runs).
    """
    text_encoders = dict(text_encoders or {})
    if model_prefix and not any(k.startswith(model_prefix) for k in shapes):
        model_prefix = ""  # a bare diffusion-model file given to a checkpoint reader
    model_shapes = {} if model_prefix is None else \
        {k[len(model_prefix):]: s for k, s in shapes.items() if k.startswith(model_prefix)}
    if policy is None:
        policy = resolve_policy(config, model_shapes, hint) if model_prefix is not None else \
            ProtectionPolicy("", frozenset())
    legacy = any(k.endswith(LEGACY_MARKER) for k in shapes)

    def is_layer(key: str) -> bool:
        base = key.removesuffix(".weight")
        return base != key and len(shapes[key]) == 2 and (linears is None or base in linears)

    def decide(key: str) -> Decision:
        if key.endswith(SCALE_SUFFIXES) or key.endswith((LEGACY_MARKER, QUANT_ENTRY_SUFFIX)):
            return Decision(COMPANION, "read with its layer", key)
        encoder = next((e for e, prefix in text_encoders.items() if key.startswith(prefix)), None)
        in_model = encoder is None and model_prefix is not None and key.startswith(model_prefix)
        rel = key[len(model_prefix):] if in_model else key
        layer = rel.removesuffix(".weight") if is_layer(key) else rel
        dtype = dtypes[key]
        if in_model and rel in policy.unit_scale:
            return Decision(UNIT_SCALE, "SD3 table: FP8 with scale 1.0", rel, True)
        if dtype in FP8_DTYPES.values():  # wherever it is: its scale must travel with it
            base = key.removesuffix(".weight")
            if is_layer(key) or any(base + suffix in shapes for suffix in WEIGHT_SCALE_SUFFIXES):
                return Decision(HELD, "already FP8 with its scale", layer, in_model)
            if linears is not None:  # a live model: the host loaded it so and runs it so
                return Decision(KEPT, "float8 as the host loaded it", rel, in_model)
            if legacy:
                return Decision(WIDEN, "bare float8 in a scaled_fp8 file: widened to float16", rel, in_model)
            raise ValueError(f"{key} is {dtype} without a weight_scale/scale_weight: not a scaled FP8 file this "
                             "pack can read")
        if not in_model and encoder is None:
            return Decision(OUTSIDE, "not quantized here", key)
        if not is_layer(key):
            return Decision(KEPT, "not a Linear weight", rel, in_model)
        if in_model:
            why = policy.why_protected(layer)
            decision = Decision(PROTECTED, why, layer, True) if why else \
                Decision(FP8, f"Linear layer ({policy.rule.split(';')[0]})", layer, True)
        elif any(word in key for word in TEXT_ENCODER_KEEP):
            decision = Decision(PROTECTED, f"{encoder}: embeddings and projections stay 16-bit", layer)
        else:
            decision = Decision(FP8, f"{encoder} Linear layer", layer)
        if decision.action == FP8 and not dtype.is_floating_point:
            raise UnsupportedQuantFormat(f"{key} is {dtype}: packed quantized data, not a weight this pack can "
                                         "quantize. Load this file with ComfyUI's own loader")
        return decision

    return Plan(config, policy, {key: decide(key) for key in shapes})


def apply(decision: Decision, tensor: torch.Tensor, config: QuantConfig, report: Report,
          scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Carry out one decision: (tensor to store, its float32 scale or None); the row (and any warning) goes into
    `report`. `scale`: a HELD layer's own scale."""
    action, name = decision.action, decision.layer
    if action in (OUTSIDE, COMPANION):
        return tensor, None
    stored, stored_scale, error, row_action = tensor, None, None, "kept"
    if action == FP8:
        quantize = quantize_weight_with_error
        if config.backend == "quanto":
            from .quanto_backend import quanto_quantize_weight as quantize
        stored, stored_scale, error = quantize(tensor, config.fp8_format, config.scaling, name=name)
        row_action = "fp8"
    elif action == HELD:
        if scale is None:
            raise ValueError(f"{name} is {tensor.dtype} without a weight_scale/scale_weight: not a scaled FP8 "
                             "layer this pack can read")
        stored_scale = scale.float()
    elif action == UNIT_SCALE and tensor.dtype.itemsize > 1:
        fp8, error, why = quantize_unit_scale(tensor.detach(), config.fp8_format, name=name)
        if why:
            report.warnings.append(why)
        if fp8 is not None:
            stored, row_action = fp8, "fp8"
    elif action == WIDEN:
        stored = tensor.to(torch.float16)
    elif action == PROTECTED:
        row_action = "protected"
    report.add(LayerReport.of(name, tensor, stored, stored_scale, error, row_action,
                              scale_before=stored_scale if action == HELD else None))
    return stored, stored_scale
