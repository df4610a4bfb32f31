"""The plan: what happens to each tensor of a model, decided once, and the one step that carries it out.

A plan is made from the tensors' names, shapes and dtypes plus a QuantConfig, before any weight is read, so a
file's header, an in-memory state dict, a torch module and a ComfyUI model are planned alike. Every rule lives
here or in policy.py (presets, patterns, variant detection); the drivers (streaming.py for files and state
dicts, quantize.py for torch modules, the pack's nodes/patching.py for ComfyUI models) hand their tensors to
engine.run_plan, which calls `apply` for each, and build their output from what it returns. A report column is
added in report.py and filled in `LayerReport.of`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from .budget import SENSITIVITY, Candidate, fit, group_factor, held_bytes
from .checkpoint import LEGACY_MARKER
from .config import QuantConfig, check_choice
from .decision import (
    ALREADY_FP8,
    COMPANION,
    FP8,
    KEPT,
    OUTSIDE,
    PROTECTED,
    STORED_FP8,
    UNIT_SCALE,
    WIDEN,
    Decision,
)
from .formats import FP8_DTYPES, quantize_unit_scale, quantize_weight_with_error
from .policy import ProtectionPolicy, resolve_policy
from .quanto_backend import quanto_quantize_weight
from .report import LayerReport, Report

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

    def fit_budget(self, report: Report, source: Callable[[str], torch.Tensor],
                   itemsize: int | None = None) -> dict[str, Decision]:
        """Fit the diffusion model's weights in the config's memory budget after a first pass filled `report`.

        `source(key)`: a tensor as it came in (to measure a preset-protected layer's FP8 error if the budget forces
        it into FP8). `itemsize`: bytes per element of the model's 16-bit tensors where the host will hold them in
        another dtype than the source's (ComfyUI builds a model in float32 on the CPU); None: as they are.

        Returns {key: new Decision} for the tensors to redo from their source; their old rows are dropped from the
        report and the plan holds the new decisions. The report gets the budget's summary (`report.budget`) and a
        warning for preset-protected layers the budget put in FP8. No budget: {}."""
        budget = self.config.memory_budget
        if budget is None:
            return {}
        candidates, fixed = self._budget_candidates(report, itemsize)
        config = self.config
        result = fit(candidates, fixed, budget, lambda c: quantize_weight_with_error(
            source(c.key), config.fp8_format, config.scaling, name=c.name)[2])
        changed = {c.key: Decision(PROTECTED, "memory budget: kept 16-bit", c.name, True) if not c.preset else
                   Decision(FP8, f"memory budget: FP8 to fit ({self[c.key].rule} would keep it 16-bit)", c.name, True)
                   for c in candidates if c.preset != (c.key in result.sixteen_bit)}
        self.decisions.update(changed)
        names = {d.layer for d in changed.values()}
        report.layers = [row for row in report.layers if row.name not in names]
        variant = self.policy.variant.name
        kept = sorted(c.name for c in candidates if not c.preset and c.key in result.sixteen_bit)
        report.budget = {"budget_bytes": budget, "bytes": result.bytes, "predicted_error": result.predicted_error,
                         "kept_16bit": kept,
                         "demoted": result.demoted,
                         "sensitivity": f"{variant or 'no measured variant: largest'} factors; {SENSITIVITY['source']}"}
        if result.demoted:
            report.warnings.append(f"memory budget: {len(result.demoted)} layer(s) the preset keeps 16-bit are FP8 to "
                                   f"fit ({', '.join(result.demoted[:8])}{', ...' if len(result.demoted) > 8 else ''})")
        return changed

    def _budget_candidates(self, report: Report, itemsize: int | None) -> tuple[list[Candidate], int]:
        """(the layers a budget may move between FP8 and 16-bit, the bytes of everything else as held)."""
        rows = {row.name: row for row in report.layers}

        def wide(row: LayerReport) -> int:  # the row's bytes when held 16-bit
            return row.bytes_before if itemsize is None else math.prod(row.shape) * itemsize

        candidates, fixed = [], 0
        variant = self.policy.variant.name
        for key, decision in self.decisions.items():
            row = rows.get(decision.layer) if decision.in_model else None
            if row is None:
                continue
            factor = group_factor(decision.layer, variant)[1]
            if row.action in STORED_FP8:
                candidates.append(Candidate(key, decision.layer, row.bytes_after, wide(row), row.rel_error, False,
                                            factor))
            elif decision.action == PROTECTED and decision.layer in self.policy.by_preset:
                rows_out = row.shape[0] if self.config.scaling == "per_channel" else 1
                candidates.append(Candidate(key, decision.layer, math.prod(row.shape) + 4 * rows_out, wide(row),
                                            None, True, factor))
            else:
                fixed += held_bytes(row, itemsize)
        return candidates, fixed

    def finish(self, report: Report) -> Report:
        """The report of a finished pass, with its closing warning."""
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
    if model_prefix and not any(k.startswith(model_prefix) for k in shapes):
        model_prefix = ""  # a bare diffusion-model file given to a checkpoint reader
    model_shapes = {} if model_prefix is None else \
        {k[len(model_prefix):]: s for k, s in shapes.items() if k.startswith(model_prefix)}
    if policy is None:
        policy = resolve_policy(config, model_shapes, hint) if model_prefix is not None else \
            ProtectionPolicy("", frozenset())
    planner = _Planner(shapes, dtypes, model_prefix, dict(text_encoders or {}), linears, policy,
                       any(k.endswith(LEGACY_MARKER) for k in shapes))
    return Plan(config, policy, {key: planner.decide(key) for key in shapes})


@dataclass
class _Planner:
    """The rules of `make_plan`, one tensor at a time."""

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, torch.dtype]
    model_prefix: str | None
    text_encoders: dict[str, str]
    linears: Collection[str] | None
    policy: ProtectionPolicy
    legacy: bool  # an older scaled_fp8 file (its marker tensor is present)

    def is_layer(self, key: str) -> bool:
        base = key.removesuffix(".weight")
        return base != key and len(self.shapes[key]) == 2 and (self.linears is None or base in self.linears)

    def decide(self, key: str) -> Decision:
        if key.endswith(SCALE_SUFFIXES) or key.endswith((LEGACY_MARKER, QUANT_ENTRY_SUFFIX)):
            return Decision(COMPANION, "read with its layer", key)
        encoder = next((e for e, prefix in self.text_encoders.items() if key.startswith(prefix)), None)
        in_model = encoder is None and self.model_prefix is not None and key.startswith(self.model_prefix)
        rel = key[len(self.model_prefix):] if in_model else key
        layer = rel.removesuffix(".weight") if self.is_layer(key) else rel
        if in_model and rel in self.policy.unit_scale:
            return Decision(UNIT_SCALE, "SD3 table: FP8 with scale 1.0", rel, True)
        if self.dtypes[key] in FP8_DTYPES.values():  # wherever it is: its scale must travel with it
            return self._arrived_fp8(key, rel, layer, in_model)
        if not in_model and encoder is None:
            return Decision(OUTSIDE, "not quantized here", key)
        if not self.is_layer(key):
            return Decision(KEPT, "not a Linear weight", rel, in_model)
        if in_model:
            why = self.policy.why_protected(layer)
            decision = Decision(PROTECTED, why, layer, True) if why else \
                Decision(FP8, f"Linear layer ({self.policy.rule.split(';')[0]})", layer, True)
        elif any(word in key for word in TEXT_ENCODER_KEEP):
            decision = Decision(PROTECTED, f"{encoder}: embeddings and projections stay 16-bit", layer)
        else:
            decision = Decision(FP8, f"{encoder} Linear layer", layer)
        if decision.action == FP8 and not self.dtypes[key].is_floating_point:
            # a loaded model (Quantize Model: ComfyUI-GGUF holds Q8_0 weights as uint8), or a file
            instead = "load the model from an F16/BF16 GGUF or a 16-bit .safetensors file" \
                if self.linears is not None else "quantize a 16-bit .safetensors file of the model"
            raise UnsupportedQuantFormat(f"{key} is {self.dtypes[key]}: packed quantized data (a GGUF Q8_0/Q4 model, "
                                         f"say), not a weight this pack can quantize. Instead, {instead}")
        return decision

    def _arrived_fp8(self, key: str, rel: str, layer: str, in_model: bool) -> Decision:
        """A float8 tensor of the input."""
        base = key.removesuffix(".weight")
        if self.is_layer(key) or any(base + suffix in self.shapes for suffix in WEIGHT_SCALE_SUFFIXES):
            return Decision(ALREADY_FP8, "already FP8 with its scale", layer, in_model)
        if self.linears is not None:  # a live model: the host loaded it so and runs it so
            return Decision(KEPT, "float8 as the host loaded it", rel, in_model)
        if self.legacy:
            return Decision(WIDEN, "bare float8 in a scaled_fp8 file: widened to float16", rel, in_model)
        raise ValueError(f"{key} is {self.dtypes[key]} without a weight_scale/scale_weight: not a scaled FP8 file "
                         "this pack can read")


def apply(decision: Decision, tensor: torch.Tensor, config: QuantConfig, report: Report,
          scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Carry out one decision: (tensor to store, its float32 scale or None); the row (and any warning) goes into
    `report`, with the action carried out (a unit-scale table FP8 cannot hold accurately enough stays 16-bit: kept).
    `scale`: an ALREADY_FP8 layer's own scale."""
    action, name = decision.action, decision.layer
    if action in (OUTSIDE, COMPANION):
        return tensor, None
    stored, stored_scale, error, done = tensor, None, None, action
    if action == FP8:
        quantize = quanto_quantize_weight if config.backend == "quanto" else quantize_weight_with_error
        stored, stored_scale, error = quantize(tensor, config.fp8_format, config.scaling, name=name)
    elif action == ALREADY_FP8:
        if scale is None:
            raise ValueError(f"{name} is {tensor.dtype} without a weight_scale/scale_weight: not a scaled FP8 "
                             "layer this pack can read")
        stored_scale = scale.float()
    elif action == UNIT_SCALE:
        done = KEPT
        if tensor.dtype.itemsize > 1:
            fp8, error, why = quantize_unit_scale(tensor.detach(), config.fp8_format, name=name)
            if why:
                report.warnings.append(why)
            if fp8 is not None:
                stored, done = fp8, UNIT_SCALE
    elif action == WIDEN:
        stored = tensor.to(torch.float16)
    report.add(LayerReport.of(name, tensor, stored, stored_scale, error, done,
                              scale_before=stored_scale if action == ALREADY_FP8 else None))
    return stored, stored_scale
