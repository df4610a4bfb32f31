"""Section 1, memory: bytes of the full-size transformers as FP16, ours, ComfyUI's fp8 cast and quanto qfloat8.

Bytes follow from shapes and dtypes alone, so they are counted exactly on the meta-device architecture
(depth 38 / 24). The per-tensor rules are then checked against real, quantized models of depth 2 (full
width: first block, last block, embedders, pos_embed) built by each method: `verified` says they agree.
pos_embed (9% of Medium) is stored in FP8 with scale 1.0; the study below is the data for that choice.
"""

from __future__ import annotations

import torch

from quant.config import QuantConfig
from quant.formats import dequantize_weight, quantize_weight
from quant.policy import resolve_policy

from . import models
from .common import log, rel_err

VARIANTS = ("sd35_large", "sd35_medium")


def _fp8_weights(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """Keys of the Linear weights our default preset (auto) quantizes."""
    policy = resolve_policy(QuantConfig(), shapes)
    return {k for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2
            and policy.should_quantize(k[: -len(".weight")], s)}


def _fp8_tables(shapes: dict[str, tuple[int, ...]]) -> frozenset[str]:
    """Keys of the non-Linear tables (pos_embed) our default preset stores in FP8 with scale 1.0."""
    return resolve_policy(QuantConfig(), shapes).unit_scale


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def arithmetic(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Bytes per method from shapes. Ours: FP8 + float32 [out, 1] scale; quanto: FP8 + float16 [out, 1]
    scale + two float16 scalars per layer; both: pos_embed one byte (scale 1.0); ComfyUI's cast: every tensor
    one byte; the rest 16-bit."""
    fp8, tables = _fp8_weights(shapes), _fp8_tables(shapes)
    out = {"fp16": 0, "ours": 0, "quanto": 0, "comfy_cast": 0}
    for key, shape in shapes.items():
        n = _numel(shape)
        out["fp16"] += 2 * n
        out["comfy_cast"] += n
        if key in fp8:
            out["ours"] += n + 4 * shape[0]
            out["quanto"] += n + 2 * shape[0] + 4
        elif key in tables:
            out["ours"] += n
            out["quanto"] += n
        else:
            out["ours"] += 2 * n
            out["quanto"] += 2 * n
    return out


def _state_bytes(module: torch.nn.Module) -> int:
    total = 0
    for tensor in module.state_dict().values():
        data = getattr(tensor, "_data", None)
        if data is not None:  # quanto QTensor: its inner tensors are what it stores
            total += data.numel() * data.element_size() + tensor._scale.numel() * tensor._scale.element_size()
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def verify_real(variant: str, depth: int = 2) -> dict:
    """Quantize a real depth-`depth` full-width model with each method; compare its bytes with `arithmetic`."""
    ref = models.reference(variant, depth, "gaussian").half()
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    expected = arithmetic(shapes)
    real = {"fp16": _state_bytes(ref)}
    real["ours"] = _state_bytes(models.ours(ref, QuantConfig()))
    real["quanto"] = _state_bytes(models.quanto(ref))
    real["comfy_cast"] = _state_bytes(models.comfy_cast(ref, variant, depth))
    return {"depth": depth, "real_bytes": real, "arithmetic_bytes": expected, "verified": real == expected}


def pos_embed_study(variant: str) -> dict:
    """`pos_embed` (not a Linear, the sin-cos table): its share of the model, and its FP8 error with scale 1.0
    (what we store: stock ComfyUI reads it) against absmax scales per hidden channel and per tensor."""
    shape = tuple(models.meta_model(variant, depth=1).pos_embed.shape)
    from .weights import sincos_pos_embed

    table = sincos_pos_embed(shape)[0].t().contiguous()  # [hidden, patches]: one scale per hidden channel
    errors = {"unit_scale": rel_err(table, table.to(torch.float8_e4m3fn))}
    for scaling in ("per_channel", "per_tensor"):
        q, s = quantize_weight(table, "float8_e4m3fn", scaling, name="pos_embed")
        errors[scaling] = rel_err(table, dequantize_weight(q, s))
    return {"shape": list(shape), "values": _numel(shape), "fp8_rel_err": errors, "hidden": shape[-1]}


def run(quick: bool) -> dict:
    out = {}
    for variant in VARIANTS:
        log(f"memory: {variant}")
        meta = models.meta_model(variant)
        shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        bytes_ = arithmetic(shapes)
        fp8 = _fp8_weights(shapes)
        kept = sorted(((2 * _numel(s), k) for k, s in shapes.items() if k not in fp8 | _fp8_tables(shapes)),
                      reverse=True)
        pos = pos_embed_study(variant)
        pos_bytes = 2 * pos["values"]
        if_protected = bytes_["ours"] + pos["values"] if "pos_embed" in _fp8_tables(shapes) else bytes_["ours"]
        out[variant] = {
            "depth": models.depth_of(variant),
            "params": sum(_numel(s) for s in shapes.values()),
            "bytes": bytes_,
            "ratio": bytes_["ours"] / bytes_["fp16"],
            "comfy_cast_ratio": bytes_["comfy_cast"] / bytes_["fp16"],
            "quanto_ratio": bytes_["quanto"] / bytes_["fp16"],
            "fp8_layers": len(fp8),
            "largest_16bit_tensors": [{"key": k, "bytes": b, "share_of_fp16": b / bytes_["fp16"]} for b, k in kept[:4]],
            "pos_embed": pos | {"share_of_fp16": pos_bytes / bytes_["fp16"]},
            "ratio_if_pos_embed_16bit": if_protected / bytes_["fp16"],
        }
        if not quick or variant == "sd35_medium":
            out[variant]["check"] = verify_real(variant)
    return out
