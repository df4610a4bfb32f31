"""Quantize Model to FP8 / Quantize Text Encoders to FP8: any loaded MODEL or CLIP in, FP8 copy out."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..quant.config import QuantConfig
from ..quant.plan import CLIP_NODE_ENCODER_CHOICES, choose_encoders
from .budget import memory_budget_input, resolve_budget
from .common import (
    CATEGORY,
    INFO_KEY,
    PackNode,
    fp8_format_input,
    protect_patterns_input,
    quant_inputs,
    record_info,
    scaling_input,
)
from .fp8_ops import check_compute_supported
from .patching import quantize_modules


class SD35FP8QuantizeModel(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35FP8QuantizeModel",
            display_name="Quantize Model to FP8",
            category=f"{CATEGORY}/quantize",
            description="Makes an FP8 copy of a loaded diffusion model: each Linear layer not protected by the preset "
                        "or your patterns is stored as FP8 with float32 scales (SD3's pos_embed table too, scale 1.0). "
                        "The input model is not changed, so the FP16 and FP8 versions can be sampled side by side. "
                        "LoRAs work before or after this node.",
            inputs=[io.Model.Input("model", tooltip="Any loaded diffusion model (SD3.5 gets tuned presets)."),
                    *quant_inputs(), protect_patterns_input(), memory_budget_input()],
            outputs=[io.Model.Output(display_name="model", tooltip="The FP8 model (a patched clone of the input)."),
                     io.String.Output(display_name="report", tooltip="Per-layer report: dtypes, bytes, error.")],
        )

    @classmethod
    def execute(cls, model, fp8_format, scaling, protect_preset, compute, protect_patterns="",
                memory_budget="") -> io.NodeOutput:
        budget = resolve_budget(memory_budget, base_model=model.model, already_loaded=model.loaded_size())
        config = QuantConfig(fp8_format=fp8_format, scaling=scaling, protect_preset=protect_preset,
                             protect_patterns=protect_patterns, compute=compute, memory_budget=budget)
        check_compute_supported(compute)
        out, report = quantize_modules(model, "diffusion_model", config)
        source = model.model_options.get(INFO_KEY, {}).get("source", "a MODEL quantized in the graph")
        record_info(out, source, report)
        return io.NodeOutput(out, report.to_text())


class SD35FP8QuantizeCLIP(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35FP8QuantizeCLIP",
            display_name="Quantize Text Encoders to FP8",
            category=f"{CATEGORY}/quantize",
            description="Makes an FP8 copy of SD3.5's text encoders. T5-XXL (4.7B parameters) is where the memory is "
                        "and tolerates FP8 well; CLIP-L/G are small and more sensitive, so the default keeps them "
                        "16-bit.",
            inputs=[
                io.Clip.Input("clip", tooltip="SD3.5 text encoders, e.g. from TripleCLIPLoader or a checkpoint."),
                io.Combo.Input("encoders", options=list(CLIP_NODE_ENCODER_CHOICES), default="t5xxl",
                               tooltip="Which encoders to store in FP8. t5xxl (default) saves most memory at the "
                                       "least cost in prompt following."),
                fp8_format_input(),
                scaling_input(),
            ],
            outputs=[io.Clip.Output(display_name="clip", tooltip="The CLIP with FP8 text encoders (a patched clone)."),
                     io.String.Output(display_name="report", tooltip="Per-layer report.")],
        )

    @classmethod
    def execute(cls, clip, encoders, fp8_format, scaling) -> io.NodeOutput:
        chosen = choose_encoders("encoders", encoders, CLIP_NODE_ENCODER_CHOICES)
        cond_model = clip.patcher.model
        present = [e for e in chosen if getattr(cond_model, e, None) is not None]
        out = clip.clone()
        out.patcher, report = quantize_modules(
            clip.patcher, "", QuantConfig(fp8_format=fp8_format, scaling=scaling),
            text_encoders={e: f"{e}." for e in present},
            rule=f"text encoders: {', '.join(present) or 'none'} in FP8 (embeddings and projections kept 16-bit)")
        report.warnings += [f"this CLIP has no {e} encoder; nothing to quantize there" for e in chosen
                            if e not in present]
        return io.NodeOutput(out, report.to_text())
