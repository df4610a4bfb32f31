"""Why the stock loader on our saved file (per-tensor) erred less than our loader (per-channel) on the H200.

The H200 run (issue 22): SD3.5 Medium, random bf16 weights (bench.gpu's recipe), float16 compute, rel. L2 of the
denoiser output vs stock FP16: stock loader on our stock_compatible file 0.0414, our loader (weight_only) 0.0456.
This rebuilds both routes from the same weights at reduced depth, full width, on the CPU, with the real code of
each route:

- ref: what stock FP16 computes, the bf16 file's values rounded to float16;
- ours: quant.streaming per-channel FP8 + the pack's FP8 ops (weight_only: dequantize, then matmul);
- stock: Save FP8 Model's `fp8_state_dict(layout="stock_compatible")` of that model (per-channel -> per-tensor
  rewrite), loaded by ComfyUI 0.8.0's mixed-precision ops with the layers marked full precision.

Per route: FP8 layer count and bytes, per-layer weight error vs ref (dequantized in float32 and as a float16 GPU
does it), and the output error. Then the output error of other quantizations of the same weights, to tell a
systematic gap from chance: per-tensor quantized once, and "dithered" realizations (each row's scale multiplied
by a random 2**u, u in [0, 1): the same FP8 grid statistics, other rounding) of per-channel and per-tensor.
Compute is float32 (a float16 matmul is ~4x slower on this CPU); --fp16 also runs ref, ours and stock in float16.

Measured here (2 shared cores, depth 3, 256px, gpu weights, seed 0): the two routes hold the same 33 FP8 layers
and the same 16-bit tensors; dequantizing in float16 moves the output error by < 1e-4; Save FP8 Model's per-channel
-> per-tensor rewrite rounds every weight a second time (weight error 0.0265 -> 0.0374) and the output error goes
0.0299 -> 0.0411; per-tensor quantized once from the source lands at 0.0302, and single realizations of either
scaling spread over 0.029..0.034. Peak RSS 5.7 GiB.

    COMFY_HOST=0.8.0 python -m bench.error_gap                       # depth 3, 256px, batch 2, 3 realizations
    COMFY_HOST=0.8.0 python -m bench.error_gap --depth 2 --pixels 128 --fp16 --out /tmp/error_gap.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import statistics
import types
from pathlib import Path

import torch

from sd35_fp8.quant.checkpoint import QUANT_METADATA_KEY, quantization_metadata
from sd35_fp8.quant.config import QuantConfig
from sd35_fp8.quant.formats import dequantize_weight, fp8_max, quantize_weight, quantize_with_scale
from sd35_fp8.quant.report import nbytes
from sd35_fp8.quant.streaming import quantize_state_dict
from tools import tiny_sd35

from . import models
from .common import boot_host, log, rel_err, setup_torch
from .gpu import random_state_dict

VARIANT = "sd35_medium"
MIB = 1024**2


def _pack():
    """The pack's nodes (sd35_fp8.nodes: they import comfy, so only after the host booted)."""
    return types.SimpleNamespace(**{m: importlib.import_module(f"sd35_fp8.nodes.{m}")
                                    for m in ("fp8_ops", "fp8_tables", "save")})


def _mmdit(depth: int, ops, dtype: torch.dtype) -> torch.nn.Module:
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    return MMDiT(**tiny_sd35.mmdit_kwargs(VARIANT, depth), operations=ops, device="cpu", dtype=dtype).eval()


def _load(model: torch.nn.Module, sd: dict) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def source(depth: int, seed: int, weights: str) -> dict[str, torch.Tensor]:
    """The bf16 'file'. `gpu`: bench.gpu's recipe (write_model_file: Gaussian 1/sqrt(fan_in) drawn by a seeded
    generator in state-dict order, zero biases, unit norms, SD3's sin-cos pos_embed), what the H200 run loaded;
    `gaussian` / `student_t`: bench.weights' kinds (what bench.stock_path measured on)."""
    if weights != "gpu":
        model = models.reference(VARIANT, depth, weights, seed)
        return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    return dict(random_state_dict(VARIANT, depth, torch.device("cpu"), seed))


def reference(sd: dict, depth: int, dtype: torch.dtype) -> torch.nn.Module:
    """Stock FP16: ComfyUI's float16 model of the bf16 file (values rounded to float16), computed in `dtype`."""
    import comfy.ops

    return _load(_mmdit(depth, comfy.ops.disable_weight_init, dtype), {k: v.half() for k, v in sd.items()})


def ours(pack, sd: dict, depth: int, dtype: torch.dtype) -> torch.nn.Module:
    """Our loader's model: streaming quantize (per-channel, default preset, compute weight_only), 16-bit tensors in
    float16 (the model dtype ComfyUI picked on the H200), built with the pack's FP8 ops."""
    qsd, _, _ = quantize_state_dict(dict(sd), QuantConfig(compute="weight_only", protect_preset=VARIANT))
    qsd = {k: v if v.dtype == torch.float8_e4m3fn or k.endswith(".weight_scale") else v.half() for k, v in qsd.items()}
    with pack.fp8_tables.fp8_tables_in_place(qsd, ""):
        return _load(_mmdit(depth, pack.fp8_ops.make_fp8_ops("weight_only"), dtype), qsd)


def stock_file(pack, model: torch.nn.Module) -> tuple[dict, dict[str, str]]:
    """What Save FP8 Model writes for `model` (layout stock_compatible): its own fp8_state_dict, with ComfyUI's
    move-to-GPU step skipped (the model is already where it runs)."""
    import comfy.model_management

    patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=model))
    real = comfy.model_management.load_models_gpu
    comfy.model_management.load_models_gpu = lambda *a, **k: None
    try:
        sd, formats, _ = pack.save.fp8_state_dict(patcher, "stock_compatible")
    finally:
        comfy.model_management.load_models_gpu = real
    return sd, formats


def stock(sd: dict, formats: dict[str, str], depth: int, dtype: torch.dtype) -> torch.nn.Module:
    """Stock ComfyUI 0.8.0 on that file: its header converted to `.comfy_quant` entries, the mixed-precision ops
    ComfyUI picks for it, the layers loaded by those ops (as bench.stock_path builds it)."""
    import comfy.ops
    import comfy.utils

    metadata = {QUANT_METADATA_KEY: quantization_metadata(formats)}
    sd, _ = comfy.utils.convert_old_quants(dict(sd), "", metadata=metadata)
    config = types.SimpleNamespace(quant_config=comfy.utils.detect_layer_quantization(sd, ""))
    ops = comfy.ops.pick_operations(None, dtype, model_config=config)
    return _load(_mmdit(depth, ops, dtype), sd)


def fp8_layers(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (float8 data, float32 scale)} of every FP8 Linear, whichever ops hold it."""
    from comfy.quant_ops import QuantizedTensor

    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, QuantizedTensor):
            out[name] = (weight._qdata, weight._params.scale.float())
        elif isinstance(weight, torch.Tensor) and weight.dtype == torch.float8_e4m3fn:
            out[name] = (weight, module.weight_scale.float())
    return out


def gpu_dequantize(qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantize as weight_only / comfy-kitchen's eager backend do it on a GPU in float16: both factors cast to
    float16 first (the scale rounded to float16), the product rounded to float16."""
    return qdata.to(torch.float16) * scale.to(torch.float16)


class WeightErrors:
    """Sums of ||w_ref||^2 and ||w - w_ref||^2 over layers, and the per-layer relative errors."""

    def __init__(self) -> None:
        self.ref, self.diff, self.layers = 0.0, 0.0, []

    def add(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        r = float(ref.double().square().sum())
        d = float((approx.double() - ref.double()).square().sum())
        self.ref, self.diff = self.ref + r, self.diff + d
        self.layers.append(math.sqrt(d / r))

    def summary(self) -> dict:
        return {"total": math.sqrt(self.diff / self.ref), "mean": statistics.fmean(self.layers),
                "min": min(self.layers), "max": max(self.layers), "layers": len(self.layers)}


def weight_report(sd: dict, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Per route: weight error vs the float16 reference, dequantized in float32 and as on a float16 GPU, and how
    far the two dequantizations are apart; the scales' range."""
    f32, f16, rounding = WeightErrors(), WeightErrors(), WeightErrors()
    scales = []
    for name, (qdata, scale) in layers.items():
        ref = sd[f"{name}.weight"].half().float()
        exact = dequantize_weight(qdata, scale, torch.float32)
        half = gpu_dequantize(qdata, scale).float()
        f32.add(ref, exact)
        f16.add(ref, half)
        rounding.add(exact, half)
        scales.append(scale.reshape(-1))
    scales = torch.cat(scales)
    return {"fp8_layers": len(layers), "fp8_bytes": nbytes(*(t for pair in layers.values() for t in pair)),
            "dequant_float32": f32.summary(), "dequant_float16_gpu": f16.summary(),
            "float16_dequant_vs_float32": rounding.summary(),
            "scale_min": float(scales.min()), "scale_max": float(scales.max()),
            "scales_below_float16_normal": int((scales < torch.finfo(torch.float16).tiny).sum())}


def dithered(weight: torch.Tensor, scaling: str, gen: torch.Generator) -> torch.Tensor:
    """One FP8 realization of `weight` with the grid statistics of `scaling` and other rounding: the absmax scale
    times 2**u (u uniform in [0, 1), per row, or one per tensor), dequantized in float32."""
    w = weight.float()
    _, scale = quantize_weight(w, "float8_e4m3fn", scaling)
    factor = torch.rand(scale.shape, generator=gen).mul_(math.log(2.0)).exp_()
    scale = scale * factor  # >= the absmax scale: nothing saturates
    assert float((w / scale).abs().max()) <= fp8_max("float8_e4m3fn")
    return dequantize_weight(quantize_with_scale(w, scale), scale, torch.float32)


@contextlib.contextmanager
def weights_swapped(model: torch.nn.Module, sd: dict, layers, make):
    """`model` (the reference) with each layer's weight replaced by `make(name)` (float32), one layer at a time;
    the reference values (float16 of the source) put back after."""
    try:
        for name in layers:
            model.get_submodule(name).weight.data.copy_(make(name))
        yield model
    finally:
        for name in layers:
            model.get_submodule(name).weight.data.copy_(sd[f"{name}.weight"].half())


def run(args: argparse.Namespace) -> dict:
    pack = _pack()
    inp = models.inputs(args.pixels, batch=args.batch)
    sd = source(args.depth, args.seed, args.weights)
    out: dict = {"variant": VARIANT, "depth": args.depth, "width": 1536, "pixels": args.pixels, "batch": args.batch,
                 "seed": args.seed, "weights": args.weights, "compute": "float32",
                 "source_bytes": nbytes(*sd.values())}
    log("ref")
    ref_model = reference(sd, args.depth, torch.float32)
    ref_out = models.forward(ref_model, inp)
    del ref_model
    routes = {}
    log("ours (per-channel, weight_only)")
    model = ours(pack, sd, args.depth, torch.float32)
    our_layers = fp8_layers(model)
    routes["ours"] = weight_report(sd, our_layers) | {"rel_err": rel_err(ref_out, models.forward(model, inp))}
    out["sixteen_bit_max_diff_vs_ref"] = _sixteen_bit_diff(sd, model, our_layers)
    log("stock (Save FP8 Model stock_compatible -> ComfyUI mixed-precision ops, full precision)")
    ssd, sformats = stock_file(pack, model)
    out["pos_embed"] = {"ours": str(model.pos_embed.dtype), "saved_file": str(ssd["pos_embed"].dtype)}
    pos_embed = model.pos_embed.detach()  # FP8 (scale 1.0) or 16-bit: the same in both routes
    del model
    smodel = stock(ssd, sformats, args.depth, torch.float32)
    del ssd
    stock_layers = fp8_layers(smodel)
    routes["stock"] = weight_report(sd, stock_layers) | {"rel_err": rel_err(ref_out, models.forward(smodel, inp))}
    del smodel
    out["same_fp8_layers"] = sorted(our_layers) == sorted(stock_layers) == sorted(sformats)
    out["routes"] = routes
    ref_model = reference(sd, args.depth, torch.float32)
    ref_model.pos_embed.copy_(pos_embed)  # the variants below differ from the routes in Linear weights only
    del pos_embed
    log("float16-dequantized weights (as on the GPU) in the reference model")
    for name, layers in (("ours", our_layers), ("stock", stock_layers)):
        with weights_swapped(ref_model, sd, layers, lambda k, layers=layers: gpu_dequantize(*layers[k])):
            routes[name]["rel_err_float16_dequant"] = rel_err(ref_out, models.forward(ref_model, inp))
    del stock_layers
    log("per-tensor quantized once")
    once = {k: quantize_weight(sd[f"{k}.weight"].float(), "float8_e4m3fn", "per_tensor") for k in our_layers}
    out["per_tensor_once"] = weight_report(sd, once)
    with weights_swapped(ref_model, sd, once, lambda k: dequantize_weight(*once[k])):
        out["per_tensor_once"]["rel_err"] = rel_err(ref_out, models.forward(ref_model, inp))
    gen = torch.Generator().manual_seed(args.seed + 1)
    out["dithered"] = {}
    for scaling in ("per_channel", "per_tensor"):
        errs = []
        for i in range(args.dither):
            log(f"dithered {scaling} {i + 1}/{args.dither}")
            with weights_swapped(ref_model, sd, our_layers, lambda k, s=scaling: dithered(sd[f"{k}.weight"], s, gen)):
                errs.append(rel_err(ref_out, models.forward(ref_model, inp)))
        out["dithered"][scaling] = errs
    del ref_model
    if args.fp16:
        out["float16_compute"] = _fp16_compute(pack, sd, args, inp)
    return out


def _sixteen_bit_diff(sd: dict, model: torch.nn.Module, fp8: dict) -> float:
    """Largest |difference| between a 16-bit tensor of our model outside its FP8 layers (biases, norms, embedders,
    final layer; pos_embed unless it is FP8, as in both routes) and the reference's: 0 when they hold the same."""
    return max(float((t.float() - sd[k].half().float()).abs().max()) for k, t in model.state_dict().items()
               if t.dtype != torch.float8_e4m3fn
               and not (k.rsplit(".", 1)[0] in fp8 and k.endswith((".weight", ".weight_scale"))))


def _fp16_compute(pack, sd: dict, args: argparse.Namespace, inp: dict) -> dict:
    """ref, ours and stock again with float16 activations and weights, as on the H200 (slow on a CPU)."""
    inp16 = {k: v if k == "t" else v.half() for k, v in inp.items()}
    log("float16 compute: ref")
    ref_out = models.forward(reference(sd, args.depth, torch.float16), inp16).float()
    log("float16 compute: ours")
    model = ours(pack, sd, args.depth, torch.float16)
    res = {"ours": rel_err(ref_out, models.forward(model, inp16).float())}
    ssd, sformats = stock_file(pack, model)
    del model
    log("float16 compute: stock")
    res["stock"] = rel_err(ref_out, models.forward(stock(ssd, sformats, args.depth, torch.float16), inp16).float())
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3, help="joint blocks (full width 1536; full size is 24)")
    parser.add_argument("--pixels", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2, help="samples (timesteps 900..100)")
    parser.add_argument("--weights", default="gpu", choices=("gpu", "gaussian", "student_t"),
                        help="gpu: bench.gpu's recipe (the H200 run); gaussian / student_t: bench.weights'")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--dither", type=int, default=3, help="dithered realizations per scaling")
    parser.add_argument("--fp16", action="store_true", help="also ref/ours/stock in float16 compute (slow)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)
    os.environ.setdefault("COMFY_HOST", "0.8.0")
    setup_torch()
    boot_host()
    out = run(args)
    print(table(out))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
        log(f"wrote {args.out}")
    return 0


def table(out: dict) -> str:
    """The figures as a markdown table: one row per route or quantization of the same weights."""
    lines = [f"SD3.5 Medium, depth {out['depth']}, width 1536, {out['pixels']}px, batch {out['batch']}, "
             f"{out['weights']} weights (seed {out['seed']}), float32 compute; FP8 layers the same in both routes: "
             f"{out['same_fp8_layers']}; 16-bit tensors, ours vs ref, max |diff| {out['sixteen_bit_max_diff_vs_ref']}; "
             f"pos_embed {out['pos_embed']}",
             "", "| route | FP8 layers | FP8 bytes | weight err (f32 dequant) | weight err (f16 dequant) "
             "| out err (f32 dequant) | out err (f16 dequant) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in out["routes"].items():
        lines.append(f"| {name} | {r['fp8_layers']} | {r['fp8_bytes']} | {r['dequant_float32']['total']:.5f} "
                     f"| {r['dequant_float16_gpu']['total']:.5f} | {r['rel_err']:.5f} "
                     f"| {r['rel_err_float16_dequant']:.5f} |")
    once = out["per_tensor_once"]
    lines.append(f"| per-tensor, quantized once | {once['fp8_layers']} | {once['fp8_bytes']} "
                 f"| {once['dequant_float32']['total']:.5f} | {once['dequant_float16_gpu']['total']:.5f} "
                 f"| {once['rel_err']:.5f} | - |")
    for scaling, errs in out["dithered"].items():
        lines.append(f"| {scaling}, dithered x{len(errs)} | | | | | "
                     f"{min(errs):.5f}..{max(errs):.5f} (mean {statistics.fmean(errs):.5f}) | - |")
    if "float16_compute" in out:
        lines.append(f"\nfloat16 compute: ours {out['float16_compute']['ours']:.5f}, "
                     f"stock {out['float16_compute']['stock']:.5f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
