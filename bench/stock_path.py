"""Section 7, files for stock ComfyUI: the output error of stock ComfyUI 0.8.0's own FP8 path on our files.

Why: ComfyUI 0.8.0 on an FP8 GPU runs a layer of a mixed-precision file FP8 x FP8 (comfy-kitchen's
`scaled_mm`), quantizing its activation with one scale per tensor: the file's `input_scale`, or 1.0 without one.
Or, where the layer's entry says `full_precision_matrix_mult`, it dequantizes the weight and multiplies in
16-bit. Which one our files should ask for is measured here, in a child process that boots ComfyUI 0.8.0 with
--supports-fp8-compute (it then decides as on an FP8 GPU; torch's CPU scaled_mm executes the FP8 route):

- stock_no_input_scale: per-tensor e4m3 layers, no `input_scale` (activations scaled by 1.0, clipped at +-448);
- stock_calibrated: the same plus `input_scale` = max |input| / 448 per layer, recorded on the 16-bit model over
  a few sampling steps (timesteps 1000..250) of *other* latents and prompts than the ones measured;
- stock_full_precision: the entries marked `full_precision_matrix_mult` (what Save FP8 Model writes);
- ours_weight_only / ours_fp8_matmul: our loaders' FP8 layers (per-channel e4m3), the second with per-token
  dynamic activation scales through torch._scaled_mm (run on the CPU here by replacing `quant.linear.runs_scaled_mm`).

Error: relative, of one denoiser forward against the 16-bit model computed in float32, on the tiny test architecture
(SD3.5 Large shapes, depth 2, hidden 128) and on Medium at full width and reduced depth. `scaled_mm_calls` counts
the FP8 matmuls stock ComfyUI ran, so a silent fallback would show.
"""

from __future__ import annotations

import functools
import json
import sys
import types

import torch

from sd35_fp8.quant import linear
from sd35_fp8.quant.checkpoint import LAYER_MARKING, QUANT_METADATA_KEY
from sd35_fp8.quant.config import QuantConfig
from sd35_fp8.quant.streaming import quantize_state_dict
from tools import tiny_sd35

from . import models
from .common import boot_host, log, rel_err, run_child, setup_torch

CALIBRATION_TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)


def run(quick: bool) -> dict:
    """Measure in a child process on ComfyUI 0.8.0 in FP8-device mode; returns its figures."""
    return run_child("bench.stock_path", "--child", *(["--quick"] if quick else []), COMFY_HOST="0.8.0",
                     COMFY_FP8_DEVICE="1")


def _calibrate(model: torch.nn.Module, inp: dict) -> dict[str, float]:
    """max |input| of every Linear over a few sampling steps of the 16-bit model."""
    seen: dict[str, float] = {}

    def record(name: str, module: torch.nn.Module, args: tuple) -> None:
        seen[name] = max(seen.get(name, 0.0), float(args[0].detach().abs().max()))

    hooks = [m.register_forward_pre_hook(functools.partial(record, n))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for t in CALIBRATION_TIMESTEPS:
        models.forward(model, inp, t=torch.full((inp["x"].shape[0],), t))
    for hook in hooks:
        hook.remove()
    return seen


def _stock_model(sd16: dict, variant: str, depth: int | None, full_precision: bool,
                 input_absmax: dict[str, float] | None) -> torch.nn.Module:
    """What stock ComfyUI 0.8.0 builds from our stock-layout file: its `convert_old_quants` turns the header into
    `.comfy_quant` entries, its `pick_operations` picks the mixed-precision ops for this device, and those ops
    load the layers. (The model is built directly rather than by `load_diffusion_model_state_dict`: its detection
    reads the depth off the width and would expect every block of a reduced-depth model.)"""
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    sd, formats, _ = quantize_state_dict(dict(sd16), QuantConfig(scaling="per_tensor"))
    layers = {name: {"format": fmt, **(LAYER_MARKING if full_precision else {})} for name, fmt in formats.items()}
    for name in formats if input_absmax else ():
        sd[f"{name}.input_scale"] = torch.tensor(max(input_absmax[name], 1e-12) / 448.0)
    metadata = {QUANT_METADATA_KEY: json.dumps({"format_version": "1.0", "layers": layers})}
    sd, _ = comfy.utils.convert_old_quants(sd, "", metadata=metadata)
    config = types.SimpleNamespace(quant_config=comfy.utils.detect_layer_quantization(sd, ""))
    ops = comfy.ops.pick_operations(None, torch.float32, model_config=config)
    model = MMDiT(**tiny_sd35.mmdit_kwargs(variant, depth), operations=ops, device="cpu", dtype=torch.float32)
    model.load_state_dict(sd, strict=False)
    return model.eval()


def _ours(reference: torch.nn.Module, fp8_matmul: bool) -> torch.nn.Module:
    model = models.ours(reference)  # weight_only
    if fp8_matmul:
        linear.runs_scaled_mm = lambda device: True  # torch's CPU _scaled_mm runs the path's arithmetic here
        for module in model.modules():
            if isinstance(module, linear.FP8Linear):
                resolved = module.__dict__.setdefault("_resolved_compute", {})
                resolved.update({("cpu", dt): "fp8_matmul" for dt in (torch.float32, torch.float16, torch.bfloat16)})
    return model


def _measure(variant: str, depth: int | None, pixels: int) -> dict:
    import comfy_kitchen.tensor.fp8 as ck_fp8

    log(f"stock_path: {variant} depth {depth or 'tiny'}, {pixels}px")
    reference = models.reference(variant, depth, "student_t")  # depth None: the tiny test architecture
    inp, calib_inp = models.inputs(pixels, batch=4), models.inputs(pixels, seed=1, batch=2)
    ref_out = models.forward(reference, inp)
    absmax = _calibrate(reference, calib_inp)
    sd16 = {k: v.half() for k, v in reference.state_dict().items()}
    calls = {"n": 0}
    real = ck_fp8._fp8_scaled_mm

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    ck_fp8._fp8_scaled_mm = counted
    out: dict = {"depth": depth, "pixels": pixels, "max_input_absmax": max(absmax.values())}
    builders = {"stock_no_input_scale": lambda: _stock_model(sd16, variant, depth, False, None),
                "stock_calibrated": lambda: _stock_model(sd16, variant, depth, False, absmax),
                "stock_full_precision": lambda: _stock_model(sd16, variant, depth, True, None),
                "ours_weight_only": lambda: _ours(reference, False),
                "ours_fp8_matmul": lambda: _ours(reference, True)}
    for name, build in builders.items():  # one model at a time: each is freed once its forward returns
        calls["n"] = 0
        out[name] = {"rel_err": rel_err(ref_out, models.forward(build(), inp).float()), "scaled_mm_calls": calls["n"]}
    ck_fp8._fp8_scaled_mm = real
    return out


def child(quick: bool) -> dict:
    setup_torch()
    boot_host()
    import comfy.model_management
    import comfyui_version

    assert comfy.model_management.supports_fp8_compute(), "the child must run in FP8-device mode"
    depth, pixels = (1, 128) if quick else (4, 512)
    return {"host": f"ComfyUI {comfyui_version.__version__} --supports-fp8-compute", "weights": "student_t",
            "tiny": _measure("large", None, 128), "sd35_medium": _measure("sd35_medium", depth, pixels)}


if __name__ == "__main__":  # `--child [--quick]`: what run() starts; without --child, run() itself
    quick = "--quick" in sys.argv[1:]
    print(json.dumps(child(quick) if "--child" in sys.argv[1:] else run(quick)))
