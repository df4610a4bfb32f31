"""Section 9, T5-XXL (4.7B parameters, more than SD3.5 Medium's diffusion model): FP16 vs ours vs ComfyUI's
`fp8_e4m3fn` cast.

Bytes: ComfyUI's own T5 class at full size (its `t5_config_xxl.json`) on the meta device, planned by the pack's
text-encoder policy (sd35_fp8.quant.plan, what the loaders and Quantize Text Encoders do). Output error of the encoder
vs fp32: full width (4096, 64 heads, d_ff 10240), reduced depth, on prompts tokenized by ComfyUI's T5 tokenizer;
random weights of each kind (bench/weights.py) at T5's own initialisation scale (tiny_sd35.t5xxl_init_scale_:
the query also 1/sqrt(d_kv), the token table std 1). `ours_fp8_embedding`: ours with the token table in FP8 too
(scale 1.0, as the host would read it), the other side of the bytes goal.
"""

from __future__ import annotations

import math

import torch

from sd35_fp8.quant.config import QuantConfig
from sd35_fp8.quant.plan import FP8, make_plan
from sd35_fp8.quant.quantize import module_tensors, quantize
from tools import tiny_sd35

from . import models
from .common import log, rel_err
from .weights import KINDS, fill_

PROMPTS = ("a red fox in the snow, photograph", "an astronaut riding a horse on the moon, oil painting",
           "a bowl of ramen on a wooden table, steam rising, close-up, 35mm",
           "the words 'SD3.5 FP8' written in neon letters above a city street at night")
ENCODER = {"t5xxl": ""}  # a bare T5's names: the whole module is the encoder


def byte_counts(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Bytes per method from the plan: ours FP8 + float32 [out, 1] scale, the rest 16-bit; ComfyUI's cast: every
    tensor one byte; `ours_fp8_embedding`: ours with the token table one byte a value."""
    plan = make_plan(QuantConfig(), shapes, dict.fromkeys(shapes, torch.float16), model_prefix=None,
                     text_encoders=ENCODER)
    fp8 = set(plan.keys(FP8))
    n = {k: math.prod(s) for k, s in shapes.items()}
    ours = sum(v + 4 * shapes[k][0] if k in fp8 else 2 * v for k, v in n.items())
    return {"fp16": 2 * sum(n.values()), "ours": ours, "comfy_cast": sum(n.values()),
            "ours_fp8_embedding": ours - n["shared.weight"]}, len(fp8), \
        sorted({k.removesuffix(".weight").rsplit(".", 1)[-1] for k in shapes if k not in fp8})


def tokens() -> torch.Tensor:
    from comfy.text_encoders.sd3_clip import T5XXLTokenizer

    tok = T5XXLTokenizer()
    ids = [[t for t, _ in tok.tokenize_with_weights(p)[0]] for p in PROMPTS]
    return torch.tensor([row + [0] * (max(map(len, ids)) - len(row)) for row in ids])


def reference(depth: int, kind: str) -> torch.nn.Module:
    """The reference: float16 weights (a checkpoint's), float32 compute (ComfyUI's ops cast them per layer)."""
    model = fill_(tiny_sd35.build_t5xxl({"num_layers": depth}, "cpu", torch.float16), kind)
    tiny_sd35.t5xxl_init_scale_(model.state_dict(), tiny_sd35.t5xxl_config()["d_kv"])
    return model.eval()


def comfy_cast(ref: torch.nn.Module, depth: int) -> torch.nn.Module:
    """T5 as ComfyUI builds it with the fp8_e4m3fn text-encoder dtype: every tensor float8, cast in forward."""
    import comfy.ops
    import comfy.text_encoders.t5

    config = tiny_sd35.t5xxl_config({"num_layers": depth})
    cast = comfy.text_encoders.t5.T5(config, torch.float8_e4m3fn, "meta", comfy.ops.manual_cast).to_empty(device="cpu")
    cast.load_state_dict(ref.state_dict())
    return cast.eval()


def output_errors(depth: int, ids: torch.Tensor) -> dict:
    """Relative output error of each method, per weight kind; one FP8 variant held at a time."""
    def encode(model: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return model(ids, None, dtype=torch.float32)[0]

    out = {}
    for kind in KINDS:
        log(f"t5xxl: output error, {kind} weights, depth {depth}, {tuple(ids.shape)} tokens")
        ref = reference(depth, kind)
        expected = encode(ref)
        ours = quantize(models.sharing_copy(ref), QuantConfig(compute="weight_only"), inplace=True,
                        text_encoders=ENCODER)[0]
        table = models.sharing_copy(ours)
        table.shared.weight = torch.nn.Parameter(ref.shared.weight.to(torch.float8_e4m3fn).half(), False)
        out[kind] = {"ours": rel_err(expected, encode(ours)), "ours_fp8_embedding": rel_err(expected, encode(table))}
        del ours, table
        out[kind]["comfy_cast"] = rel_err(expected, encode(comfy_cast(ref, depth)))
        del ref
    return out


def run(quick: bool) -> dict:
    depth = 1 if quick else 4
    shapes = {k: tuple(t.shape) for k, t in module_tensors(tiny_sd35.build_t5xxl()).items()}
    bytes_, fp8_layers, kept = byte_counts(shapes)
    errors = output_errors(depth, tokens())
    fp16 = bytes_["fp16"]
    return {"params": fp16 // 2, "bytes": bytes_, "ratio": bytes_["ours"] / fp16,
            "comfy_cast_ratio": bytes_["comfy_cast"] / fp16, "ratio_fp8_embedding": bytes_["ours_fp8_embedding"] / fp16,
            "embedding_share": 2 * math.prod(shapes["shared.weight"]) / fp16, "fp8_layers": fp8_layers,
            "kept_16bit": kept, "depth": depth, "prompts": len(PROMPTS), "headline_weights": "student_t",
            **{f"{name}_rel_err": e for name, e in errors["student_t"].items()}, "by_weights": errors}
