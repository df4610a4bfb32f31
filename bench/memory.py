"""Section 1, memory: bytes of the full-size transformers as FP16, ours, ComfyUI's fp8 cast and quanto qfloat8.

Bytes follow from shapes and dtypes alone, so they are counted exactly on the meta-device architecture
(depth 38 / 24). The per-tensor rules are then checked against real, quantized models of depth 2 (full
width: first block, last block, embedders, pos_embed) built by each method: `verified` says they agree.
pos_embed (9% of Medium) is stored in FP8 with scale 1.0; the study below is the data for that choice.
"""

from __future__ import annotations

import math

import torch

from sd35_fp8.quant.config import QuantConfig
from sd35_fp8.quant.decision import FP8, UNIT_SCALE
from sd35_fp8.quant.formats import dequantize_weight, quantize_weight
from sd35_fp8.quant.plan import make_plan
from sd35_fp8.quant.report import nbytes

from . import models
from .common import log, rel_err
from .weights import sincos_pos_embed


def _fp8_keys(shapes: dict[str, tuple[int, ...]]) -> tuple[set[str], set[str]]:
    """Keys our default preset (auto) stores in FP8, as the engine's plan decides them: (Linear weights, tables
    such as pos_embed with scale 1.0)."""
    plan = make_plan(QuantConfig(), shapes, dict.fromkeys(shapes, torch.float16))
    return set(plan.keys(FP8)), set(plan.keys(UNIT_SCALE))


def arithmetic(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Bytes per method from shapes. Ours: FP8 + float32 [out, 1] scale; quanto: FP8 + float16 [out, 1]
    scale + two float16 scalars per layer; both: pos_embed one byte (scale 1.0); ComfyUI's cast: every tensor
    one byte; the rest 16-bit."""
    fp8, tables = _fp8_keys(shapes)
    out = {"fp16": 0, "ours": 0, "quanto": 0, "comfy_cast": 0}
    for key, shape in shapes.items():
        n = math.prod(shape)
        out["fp16"] += 2 * n
        out["comfy_cast"] += n
        if key in fp8:
            out["ours"] += n + 4 * shape[0]
            out["quanto"] += n + 2 * shape[0] + 4
        else:
            out["ours"] += n if key in tables else 2 * n
            out["quanto"] += n if key in tables else 2 * n
    return out


def _state_bytes(module: torch.nn.Module) -> int:
    """Bytes of the state dict; a quanto QTensor counts its inner tensors, what it stores."""
    tensors = [p for t in module.state_dict().values()
               for p in ((t._data, t._scale) if getattr(t, "_data", None) is not None else (t,))]
    return nbytes(*tensors)


def verify_real(variant: str, depth: int = 2) -> dict:
    """Quantize a real depth-`depth` full-width model with each method; compare its bytes with `arithmetic`."""
    ref = models.reference(variant, depth, "gaussian").half()
    expected = arithmetic({k: tuple(v.shape) for k, v in ref.state_dict().items()})
    real = {"fp16": _state_bytes(ref), "ours": _state_bytes(models.ours(ref, QuantConfig())),
            "quanto": _state_bytes(models.quanto(ref)),
            "comfy_cast": _state_bytes(models.comfy_cast(ref, variant, depth))}
    return {"depth": depth, "real_bytes": real, "arithmetic_bytes": expected, "verified": real == expected}


def pos_embed_study(variant: str) -> dict:
    """`pos_embed` (not a Linear, the sin-cos table): its share of the model, and its FP8 error with scale 1.0
    (what we store: stock ComfyUI reads it) against absmax scales per hidden channel and per tensor."""
    shape = tuple(models.meta_model(variant, depth=1).pos_embed.shape)
    table = sincos_pos_embed(shape)[0].t().contiguous()  # [hidden, patches]: one scale per hidden channel
    errors = {"unit_scale": rel_err(table, table.to(torch.float8_e4m3fn))}
    for scaling in ("per_channel", "per_tensor"):
        q, s = quantize_weight(table, "float8_e4m3fn", scaling, name="pos_embed")
        errors[scaling] = rel_err(table, dequantize_weight(q, s))
    return {"shape": list(shape), "values": math.prod(shape), "fp8_rel_err": errors, "hidden": shape[-1]}


def run(quick: bool) -> dict:
    out = {}
    for variant in ("sd35_large", "sd35_medium"):
        log(f"memory: {variant}")
        shapes = {k: tuple(v.shape) for k, v in models.meta_model(variant).state_dict().items()}
        bytes_ = arithmetic(shapes)
        fp8, tables = _fp8_keys(shapes)
        kept = sorted(((2 * math.prod(s), k) for k, s in shapes.items() if k not in fp8 and k not in tables),
                      reverse=True)
        pos = pos_embed_study(variant)
        fp16 = bytes_["fp16"]
        out[variant] = {
            "depth": models.depth_of(variant), "params": sum(math.prod(s) for s in shapes.values()), "bytes": bytes_,
            "ratio": bytes_["ours"] / fp16, "comfy_cast_ratio": bytes_["comfy_cast"] / fp16,
            "quanto_ratio": bytes_["quanto"] / fp16, "fp8_layers": len(fp8),
            "largest_16bit_tensors": [{"key": k, "bytes": b, "share_of_fp16": b / fp16} for b, k in kept[:4]],
            "pos_embed": pos | {"share_of_fp16": 2 * pos["values"] / fp16},
            "ratio_if_pos_embed_16bit": (bytes_["ours"] + (pos["values"] if "pos_embed" in tables else 0)) / fp16,
        }
        if not quick or variant == "sd35_medium":
            out[variant]["check"] = verify_real(variant)
    return out
