"""GPU benchmark: the pack against stock ComfyUI, side by side, each variant through the loader a user would use.

Per architecture (SD3.5 Medium and Large at full size by default), one bfloat16 diffusion-model file of random
seeded weights (Gaussian, 1/sqrt(fan_in); SD3's sin-cos pos_embed) is written, then each variant runs in a fresh
process (bench/gpu_child.py): load (file to weights on the device), then `model.apply_model` at --pixels with
batch 2 (cond + uncond, as CFG sampling runs), 3 warm-ups and --repeats timed steps (median, min, max). Variants:
stock Load Diffusion Model with weight_dtype default / fp8_e4m3fn / fp8_e4m3fn_fast, the same stock loader on the
pack's saved file (Save FP8 Model's stock-compatible layout), and the pack's loader with compute auto / weight_only
/ fp8_matmul. Error: relative L2 of the output against stock default (FP16) in the same run.

Writes --out (bench/results/gpu.json) after each architecture: device, torch/CUDA/ComfyUI versions, date, every row,
and `ratios` per architecture (the issue's goals, ours = compute auto). --profile also writes, next to --out, the
kernel table of one step (time by kernel) for stock FP16 and ours (auto and fp8_matmul).

    python -m bench.gpu --out /tmp/gpu.json --profile                 # on a CUDA machine: Medium and Large
    python -m bench.gpu --device cpu --variants tiny_large --pixels 128 --repeats 2 --out /tmp/gpu.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from sd35_fp8.quant.hardware import probe_device
from tools.tiny_sd35 import sincos_pos_embed

from . import models
from .common import RESULTS, boot_host, log, machine, now, rel_err, run_child

ARCHS = {"sd35_medium": "sd35_medium", "sd35_large": "sd35_large", "tiny_large": "large", "tiny_medium": "medium"}
STOCK_FP8 = ("stock_fp8_e4m3fn", "stock_fp8_e4m3fn_fast", "stock_on_ours")
OURS = ("ours_auto", "ours_weight_only", "ours_fp8_matmul", "ours_comfyui_native")
MODES = ("stock_fp16", *STOCK_FP8, *OURS)
PROFILED = ("stock_fp16", "ours_auto", "ours_fp8_matmul", "ours_comfyui_native")


@torch.no_grad()
def random_state_dict(variant: str, depth: int | None, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """The run's weights, bfloat16 on `device`: Gaussian 1/sqrt(fan_in) drawn by a seeded generator in state-dict
    order, zero biases, unit norms, SD3's sin-cos pos_embed (bench.error_gap rebuilds the same)."""
    model = models.meta_model(variant, depth, torch.bfloat16).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if name.endswith(".bias"):
            tensor.zero_()
        elif name == "pos_embed":
            tensor.copy_(sincos_pos_embed(tuple(tensor.shape)))
        elif tensor.dim() == 1:
            tensor.fill_(1.0)  # every 1-D weight of an MMDiT is a norm scale
        else:
            tensor.normal_(0.0, tensor[0].numel() ** -0.5, generator=gen)
    return model.state_dict()


def write_model_file(arch: str, path: Path, device: torch.device, seed: int = 0) -> int:
    """The architecture at full depth (`random_state_dict`), saved as a diffusion-model file ComfyUI detects; returns
    its parameter count."""
    sd = {name: tensor.cpu().contiguous() for name, tensor in random_state_dict(ARCHS[arch], None, device,
                                                                                  seed).items()}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the children measure the device alone
    save_file(sd, str(path))
    return sum(t.numel() for t in sd.values())


def run_arch(arch: str, args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Every mode of one architecture, each in its own process; rows with the error against stock FP16."""
    source, ours_file = work / f"{arch}_bf16.safetensors", work / f"{arch}_ours_fp8.safetensors"
    log(f"gpu: writing {source.name}")
    params = write_model_file(arch, source, torch.device(args.device))
    common = {"device": args.device, "pixels": args.pixels, "batch": args.batch, "repeats": args.repeats}
    if "stock_on_ours" in args.modes:
        log("gpu: saving the pack's FP8 file")
        run_child("bench.gpu_child", json.dumps({**common, "mode": "save_ours", "file": str(source),
                                                 "save_to": str(ours_file)}))
    rows, outputs = {}, {}
    cap = probe_device(args.device)
    for mode in args.modes:
        if mode == "ours_fp8_matmul" and not cap.fp8_matmul:
            rows[mode] = {"mode": mode, "skipped": cap.reason}
            continue
        log(f"gpu: {arch} {mode}")
        spec = {**common, "mode": mode, "file": str(ours_file if mode == "stock_on_ours" else source),
                "output": str(work / f"{arch}_{mode}.pt")}
        if args.profile and mode in PROFILED:
            spec["profile"] = str(args.out.parent / f"profile_{arch}_{mode}.txt")
        try:
            rows[mode] = run_child("bench.gpu_child", json.dumps(spec))
            outputs[mode] = torch.load(spec["output"])
        except RuntimeError as err:  # one failed variant is a row saying why, not a lost run
            rows[mode] = {"mode": mode, "error": str(err)[-1500:]}
    reference = outputs.get("stock_fp16")
    for mode, out in outputs.items():
        rows[mode]["rel_err"] = None if reference is None else rel_err(reference, out)
    for path in (source, ours_file):
        path.unlink(missing_ok=True)
    return {"params": params, "rows": rows}


def ratios(rows: dict[str, dict]) -> dict[str, float | None]:
    """The issue's goals for one architecture (ours = compute auto); None where a figure is missing. The best stock
    FP8 route is the fastest of them for the step ratio and the most accurate of them for the error."""
    ok = {m: r for m, r in rows.items() if "ms_median" in r}

    def ratio(num: str | None, mode_num: str, key: str, mode_den: str) -> float | None:
        if mode_num not in ok or mode_den not in ok or not ok[mode_den].get(key):
            return None
        return ok[mode_num][num or key] / ok[mode_den][key]

    stock8 = [m for m in STOCK_FP8 if m in ok]
    fastest = min(stock8, key=lambda m: ok[m]["ms_median"], default=None)
    errors = [ok[m]["rel_err"] for m in stock8 if ok[m].get("rel_err") is not None]
    return {
        "step_ours_over_fp16": ratio(None, "ours_auto", "ms_median", "stock_fp16"),
        "step_ours_over_best_stock_fp8": None if fastest is None else ratio(None, "ours_auto", "ms_median", fastest),
        "best_stock_fp8": fastest,
        "peak_vram_ours_over_fp16": ratio(None, "ours_auto", "peak_mib", "stock_fp16"),
        "load_ours_over_stock_fp16": ratio(None, "ours_auto", "load_s", "stock_fp16"),
        "rel_err_ours": ok.get("ours_auto", {}).get("rel_err"),
        "rel_err_best_stock_fp8": min(errors, default=None),
    }


def markdown(results: dict[str, dict]) -> str:
    lines = ["| model | variant | load s | model MiB | peak MiB | ms / step (median, min-max) | rel. err vs FP16 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for arch, res in results.items():
        for mode, r in res["rows"].items():
            if "skipped" in r:
                lines.append(f"| {arch} | {mode} | skipped: {r['skipped']} | | | | |")
                continue
            if "error" in r:
                lines.append(f"| {arch} | {mode} | failed: {r['error'].splitlines()[-1][:100]} | | | | |")
                continue
            peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            err = "-" if r.get("rel_err") is None else f"{r['rel_err']:.4f}"
            lines.append(f"| {arch} | {mode} | {r['load_s']:.1f} | {r['model_mib']:.0f} | {peak} | "
                         f"{r['ms_median']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {err} |")
    return "\n".join(lines)


def header(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"]
    from tools import comfy_host

    return {"when": now(), "device_name": name, "device": args.device, "torch": torch.__version__,
            "cuda": torch.version.cuda, "comfyui": comfy_host.host_version(), "machine": machine(),
            "pixels": args.pixels, "batch": args.batch, "image_tokens": args.batch * (args.pixels // 16) ** 2,
            "context_tokens": models.CONTEXT_TOKENS, "repeats": args.repeats, "warmup": 3,
            "weights": "random seeded, Gaussian 1/sqrt(fan_in), sin-cos pos_embed, bfloat16 file",
            "smoke_test": device.type != "cuda"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="sd35_medium,sd35_large", help=f"comma-separated, of {list(ARCHS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--pixels", type=int, default=1024, help="image side in pixels (latent side = pixels / 8)")
    parser.add_argument("--batch", type=int, default=2, help="samples per step (2: cond + uncond)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant (median kept)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the smoke test)")
    parser.add_argument("--profile", action="store_true", help="kernel tables of one step, next to --out")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results file (default: bench/results/gpu.json on a GPU, gpu_cpu_smoke.json on cpu)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model files go (default: a temp dir)")
    args = parser.parse_args(argv)
    archs = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [v for v in archs if v not in ARCHS] + [m for m in args.modes if m not in MODES]:
        parser.error(f"--variants/--modes: {unknown} not known; variants {list(ARCHS)}, modes {list(MODES)}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device: no CUDA device here; use --device cpu for the smoke test")
    args.out = args.out or RESULTS / ("gpu.json" if torch.device(args.device).type == "cuda" else "gpu_cpu_smoke.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    boot_host(cpu=torch.device(args.device).type != "cuda")  # ComfyUI's MMDiT class builds the files
    work = Path(tempfile.mkdtemp(prefix="sd35fp8_gpu_", dir=args.workdir))
    out = header(args) | {"results": {}, "ratios": {}}
    print(f"device: {out['device_name']}; torch {out['torch']}, CUDA {out['cuda']}, ComfyUI {out['comfyui']}",
          flush=True)
    try:
        for arch in archs:
            out["results"][arch] = run_arch(arch, args, work)
            out["ratios"][arch] = ratios(out["results"][arch]["rows"])
            out["table"] = markdown(out["results"])
            args.out.write_text(json.dumps(out, indent=2))  # after each architecture: a cut-off run keeps it
            print(f"\n{out['table']}\n\n{json.dumps(out['ratios'], indent=1)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {args.out}")
    failed = [f"{a}/{m}" for a, res in out["results"].items() for m, r in res["rows"].items() if "error" in r]
    if failed:
        log(f"failed variants: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
