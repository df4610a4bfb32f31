"""Quantize Model to FP8 / Quantize Text Encoders to FP8: any loaded MODEL or CLIP in, FP8 copy out."""

from __future__ import annotations

from ..quant.config import QuantConfig
from ..quant.policy import resolve_policy
from ..quant.report import Report
from .common import CATEGORY, FP8_FORMAT, INFO_KEY, PROTECT_PATTERNS, SCALING, quant_inputs, record_info
from .fp8_ops import check_compute_supported
from .patching import quantize_modules

CLIP_ENCODERS = {
    "t5xxl": ("t5xxl",),
    "t5xxl_and_clip_g": ("t5xxl", "clip_g"),
    "all": ("t5xxl", "clip_g", "clip_l"),
}


def model_shapes(model) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of a ModelPatcher's diffusion model (what the policy reads)."""
    dm = model.model.diffusion_model
    tensors = list(dm.named_parameters()) + list(dm.named_buffers())
    return {name: tuple(t.shape) for name, t in tensors}


class SD35FP8QuantizeModel:
    TITLE = "Quantize Model to FP8"
    CATEGORY = f"{CATEGORY}/quantize"
    DESCRIPTION = ("Makes an FP8 copy of a loaded diffusion model: each Linear layer not protected by the preset "
                   "or your patterns is stored as FP8 with float32 scales (SD3's pos_embed table too, scale 1.0). "
                   "The input model is not changed, so the FP16 and FP8 versions can be sampled side by side. "
                   "LoRAs work before or after this node.")
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The FP8 model (a patched clone of the input).", "Per-layer report: dtypes, bytes, error.")
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": ("MODEL", {"tooltip": "Any loaded diffusion model (SD3.5 gets tuned presets)."}),
                         **quant_inputs()},
            "optional": {"protect_patterns": PROTECT_PATTERNS},
        }

    def quantize(self, model, fp8_format, scaling, protect_preset, compute, protect_patterns=""):
        config = QuantConfig(fp8_format=fp8_format, scaling=scaling, protect_preset=protect_preset,
                             protect_patterns=protect_patterns, compute=compute)
        check_compute_supported(compute)
        shapes = model_shapes(model)
        policy = resolve_policy(config, shapes)
        report = Report(rule=policy.rule, warnings=list(policy.warnings), fp8_format=fp8_format, scaling=scaling)
        out = quantize_modules(model, "diffusion_model", policy.should_quantize, fp8_format=fp8_format,
                               scaling=scaling, compute=compute, report=report, unit_scale=policy.unit_scale)
        source = model.model_options.get(INFO_KEY, {}).get("source", "a MODEL quantized in the graph")
        record_info(out, source, policy.rule, fp8_format, scaling)
        return (out, report.to_text())


class SD35FP8QuantizeCLIP:
    TITLE = "Quantize Text Encoders to FP8"
    CATEGORY = f"{CATEGORY}/quantize"
    DESCRIPTION = ("Makes an FP8 copy of SD3.5's text encoders. T5-XXL (4.7B parameters) is where the memory is and "
                   "tolerates FP8 well; CLIP-L/G are small and more sensitive, so the default keeps them 16-bit.")
    RETURN_TYPES = ("CLIP", "STRING")
    RETURN_NAMES = ("clip", "report")
    OUTPUT_TOOLTIPS = ("The CLIP with FP8 text encoders (a patched clone).", "Per-layer report.")
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "SD3.5 text encoders, e.g. from TripleCLIPLoader or a checkpoint."}),
            "encoders": (list(CLIP_ENCODERS), {"default": "t5xxl",
                                               "tooltip": "Which encoders to store in FP8. t5xxl (default) saves "
                                                          "most memory at the least cost in prompt following."}),
            "fp8_format": FP8_FORMAT,
            "scaling": SCALING,
        }}

    def quantize(self, clip, encoders, fp8_format, scaling):
        if encoders not in CLIP_ENCODERS:
            raise ValueError(f"encoders: {encoders!r} is not one of {list(CLIP_ENCODERS)}")
        chosen = CLIP_ENCODERS[encoders]
        cond_model = clip.patcher.model
        present = [e for e in chosen if getattr(cond_model, e, None) is not None]
        report = Report(rule=f"text encoders: {', '.join(present) or 'none'} in FP8 (projections kept 16-bit)",
                        fp8_format=fp8_format, scaling=scaling)
        missing = [e for e in chosen if e not in present]
        report.warnings += [f"this CLIP has no {name} encoder; nothing to quantize there" for name in missing]

        def should_quantize(name: str, shape: tuple[int, ...]) -> bool:
            return name.split(".", 1)[0] in present and "text_projection" not in name

        out = clip.clone()
        out.patcher = quantize_modules(clip.patcher, "", should_quantize, fp8_format=fp8_format, scaling=scaling,
                                       compute="auto", report=report)
        return (out, report.to_text())
