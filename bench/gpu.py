"""GPU step benchmark: ms per transformer step and peak VRAM of full-size SD3.5 Medium and Large, bf16 vs FP8.

For a CUDA machine (the rest of bench/ is the CPU benchmark). Per variant, one denoiser forward of ComfyUI's own
MMDiT class (random weights, 154 context tokens, timestep 750) at --pixels x --pixels is timed for three models:
- bf16: the reference, every tensor bfloat16 (on the CPU: fp32, float32; and fp8_matmul is skipped);
- fp8_weight_only: quant.quantize with QuantConfig(compute="weight_only"): FP8 Linear weights, dequantized per layer;
- fp8_matmul: QuantConfig(compute="fp8_matmul"): torch._scaled_mm on FP8 tensor cores; skipped, with
  quant.hardware's reason recorded, on a device without them.

Memory plan: each model is built straight on the device and filled there by a seeded generator (`build`);
bench.weights draws on the host, too slow for 8B values. The FP8 models are the same weights rebuilt and quantized
in place, layer by layer, so a bf16 model and its FP8 copy never sit in VRAM together (Large: 16 GB of bf16 at
most). The models are measured one at a time, memory freed between them; peak VRAM is max_memory_allocated from
just after the build (the model's weights plus the step's activations). Timing: 2 warm-up forwards, then the median
of --repeats forwards, each bracketed by torch.cuda.synchronize.

ComfyUI 0.3.75 is booted by bench.common.boot_host(), without --cpu on a GPU, so its attention picks the
GPU path a real ComfyUI run would.

    python -m bench.gpu                                    # both variants, 1024x1024, 10 repeats, cuda
    python -m bench.gpu --variants sd35_large --depth 8    # fewer joint blocks, full width
    python -m bench.gpu --device cpu --depth 1 --pixels 256 --repeats 1 --out /tmp/gpu.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from quant.config import QuantConfig
from quant.hardware import DeviceCapability, probe_device
from quant.quantize import quantize
from quant.report import nbytes

from . import models
from .common import RESULTS, boot_host, log, machine, now, rel_err, setup_torch

VARIANTS = ("sd35_medium", "sd35_large")
FP8_COMPUTE = {"fp8_weight_only": "weight_only", "fp8_matmul": "fp8_matmul"}
WARMUP = 2
MIB = 1024**2


def build(variant: str, depth: int | None, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Full-width MMDiT made on `device` with no host copy; the same seed gives the same weights."""
    model = models.meta_model(variant, depth, dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(".bias"):
            tensor.data.zero_()
        elif tensor.dim() == 1:
            tensor.data.fill_(1.0)  # every 1-D weight of an MMDiT is a norm scale
        elif name == "pos_embed":
            tensor.data.normal_(0.0, 0.02, generator=gen)
        else:
            tensor.data.normal_(0.0, tensor[0].numel() ** -0.5, generator=gen)
    return model.eval()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(name: str, variant: str, depth: int | None, inp: dict[str, torch.Tensor], repeats: int,
            device: torch.device, dtype: torch.dtype) -> tuple[dict, torch.Tensor]:
    """One model alone on the device: its row of the table and its output (float32, on the host)."""
    cuda = device.type == "cuda"
    free_memory(device)
    model = build(variant, depth, device, dtype)
    if name in FP8_COMPUTE:
        config = QuantConfig(protect_preset=variant, compute=FP8_COMPUTE[name])
        model = quantize(model, config, inplace=True)[0]  # bf16 Linear weights freed layer by layer
    free_memory(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(WARMUP):
        out = models.forward(model, inp)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = models.forward(model, inp)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    row = {"ms_per_step": 1000 * statistics.median(times),
           "peak_vram_mib": torch.cuda.max_memory_allocated(device) / MIB if cuda else None,
           "weight_bytes": nbytes(*model.parameters(), *model.buffers()),
           "finite": bool(torch.isfinite(out).all())}
    return row, out.float().cpu()


def bench_variant(variant: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                  cap: DeviceCapability) -> dict:
    """Rows of one variant: the reference first, then the FP8 models with their error against it."""
    reference = "bf16" if dtype == torch.bfloat16 else "fp32"
    # As ComfyUI's model_base does: latents and conditioning in the compute dtype, the timestep in float32.
    inp = {k: v.to(device, torch.float32 if k == "t" else dtype) for k, v in models.inputs(args.pixels).items()}
    rows, ref_out = {}, None
    for name in (reference, *FP8_COMPUTE):
        if name == "fp8_matmul" and not cap.fp8_matmul:
            rows[name] = {"skipped": cap.reason}
            continue
        log(f"gpu: {variant} {name}")
        row, out = measure(name, variant, args.depth, inp, args.repeats, device, dtype)
        ref_out = out if ref_out is None else ref_out
        rows[name] = row | {"rel_err": None if name == reference else rel_err(ref_out, out)}
    return rows


def markdown(results: dict[str, dict]) -> str:
    lines = ["| variant | model | ms / step | peak VRAM (MiB) | weights (MiB) | rel. err vs reference |",
             "|---|---|---:|---:|---:|---:|"]
    for variant, rows in results.items():
        for name, r in rows.items():
            if "skipped" in r:
                lines.append(f"| {variant} | {name} | skipped: {r['skipped']} | | | |")
                continue
            peak = "n/a" if r["peak_vram_mib"] is None else f"{r['peak_vram_mib']:.0f}"
            err = "-" if r["rel_err"] is None else f"{r['rel_err']:.4f}"
            lines.append(f"| {variant} | {name} | {r['ms_per_step']:.1f} | {peak} | {r['weight_bytes'] / MIB:.0f} "
                         f"| {err}{'' if r['finite'] else ' (non-finite output)'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: sd35_medium,sd35_large")
    parser.add_argument("--pixels", type=int, default=1024, help="image side in pixels (latent side = pixels / 8)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per model (median kept)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (smoke test: float32, no fp8_matmul)")
    parser.add_argument("--depth", type=int, default=None, help="joint blocks (default: full depth, 24 / 38)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json", help="JSON results file")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"--variants: {unknown} not in {list(VARIANTS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device: no CUDA device here; use --device cpu for the smoke test")
    setup_torch()
    boot_host(cpu=device.type == "cpu")
    cap = probe_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"]
    print(f"device: {name} ({device}); torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"fp8 matmul: {'yes' if cap.fp8_matmul else 'no'} ({cap.reason})", flush=True)
    results = {v: bench_variant(v, args, device, dtype, cap) for v in variants}
    table = markdown(results)
    print(f"\n{args.pixels}x{args.pixels}, depth {args.depth or 'full'}, median of {args.repeats}, "
          f"compute dtype {str(dtype).removeprefix('torch.')}\n\n{table}")
    out = {
        "when": now(), "device_name": name, "device": asdict(cap), "torch": torch.__version__,
        "cuda": torch.version.cuda, "machine": machine(), "pixels": args.pixels,
        "image_tokens": (args.pixels // 16) ** 2, "context_tokens": models.CONTEXT_TOKENS,
        "depth": {v: args.depth or models.depth_of(v) for v in variants}, "repeats": args.repeats,
        "warmup": WARMUP, "compute_dtype": str(dtype), "results": results, "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
