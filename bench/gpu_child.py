"""One variant of the GPU benchmark, alone in a fresh process: `python -m bench.gpu_child SPEC_JSON`.

Loads a diffusion-model file through the loader a user would use, puts its weights on the device as ComfyUI does
before sampling, and times `model.apply_model` (one denoiser step of CFG sampling: batch 2, cond + uncond).
Prints one JSON line: load seconds, model and peak memory, ms per step (every repeat), and saves the output for the
parent's error figures. Modes (bench.gpu.MODES):
  stock_fp16, stock_fp8_e4m3fn, stock_fp8_e4m3fn_fast  ComfyUI's Load Diffusion Model, weight_dtype default /
                                                       fp8_e4m3fn / fp8_e4m3fn_fast
  stock_on_ours                                        the same loader (default) on the pack's saved FP8 file
  ours_auto, ours_weight_only, ours_fp8_matmul         the pack's Load SD3.5 Diffusion Model (FP8), node defaults
                                                       but compute
  ours_comfyui_native                                  the same loader handing ComfyUI its own FP8 layers
                                                       (compute comfyui_native, scaling per_tensor)
  save_ours                                            the pack's loader (defaults) and Save FP8 Model's writer: the
                                                       file stock_on_ours loads (not timed)
With "profile": true, one more step runs under torch.profiler and its kernel table goes to spec["profile"].
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

STOCK_DTYPES = {"stock_fp16": {}, "stock_on_ours": {}, "stock_fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
                "stock_fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}}
WARMUP = 3
MIB = 1024**2


def _pack():
    """The pack's nodes (sd35_fp8.nodes; they import comfy, so only after the host booted)."""
    importlib.import_module("sd35_fp8.nodes.loaders")
    importlib.import_module("sd35_fp8.nodes.save")
    return sys.modules["sd35_fp8.nodes"]


def load(mode: str, path: Path):
    """The ModelPatcher the user's loader gives for `mode`."""
    import comfy.sd
    import folder_paths

    if mode in STOCK_DTYPES:
        return comfy.sd.load_diffusion_model(str(path), model_options=dict(STOCK_DTYPES[mode]))
    folder_paths.add_model_folder_path("diffusion_models", str(path.parent))
    compute = "auto" if mode == "save_ours" else mode.removeprefix("ours_")
    loader = _pack().loaders.SD35FP8DiffusionModelLoader
    # the stock file rounded once, as loaded; ComfyUI's own layers take one scale per layer
    scaling = "per_tensor" if mode in ("save_ours", "ours_comfyui_native") else "per_channel"
    return loader.execute(path.name, "float8_e4m3fn", scaling, "auto", compute).args[0]


def inputs(pixels: int, batch: int, device: torch.device) -> dict:
    """The benchmark's seeded latents, 154 context tokens and pooled vectors (bench.models.inputs), float32 as
    sampling passes them (apply_model casts them to the model's compute dtype), at sigma 0.75."""
    from bench import models

    inp = models.inputs(pixels, batch=batch)
    return {"x": inp["x"].to(device), "c_crossattn": inp["context"].to(device), "y": inp["y"].to(device),
            "t": torch.full((batch,), 0.75, device=device)}


def step(model, inp: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model.apply_model(inp["x"], inp["t"], c_crossattn=inp["c_crossattn"], y=inp["y"])


def profile_step(model, inp: dict, out: Path, sync) -> None:
    """Kernel table (time by kernel, count) of one step, sorted by device time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            step(model, inp)
            sync()
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        out.write_text(prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90))
    except Exception as err:  # noqa: BLE001 - a failed profile must not lose the timings already taken
        out.write_text(f"profile failed: {err!r}")


def run(spec: dict) -> dict:
    from bench.common import boot_host

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    boot_host(cpu=not cuda)
    import comfy.model_management
    import comfy.sd  # imported before the clock starts: load_s is the load alone

    _pack()

    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    mem = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
    path, mode = Path(spec["file"]), spec["mode"]
    before = mem()
    start = time.perf_counter()
    patcher = load(mode, path)
    if mode == "save_ours":
        from sd35_fp8.quant.checkpoint import save_quantized

        sd, formats, notes = _pack().save.fp8_state_dict(patcher, "stock_compatible")
        save_quantized(spec["save_to"], sd, formats, overwrite=True)
        return {"mode": mode, "saved": spec["save_to"], "fp8_layers": len(formats), "notes": notes}
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    sync()
    result = {"mode": mode, "load_s": time.perf_counter() - start, "model_mib": (mem() - before) / MIB}
    model = patcher.model
    inp = inputs(spec["pixels"], spec["batch"], device)
    for _ in range(WARMUP):
        out = step(model, inp)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(spec["repeats"]):
        sync()
        begin = time.perf_counter()
        out = step(model, inp)
        sync()
        times.append(1000 * (time.perf_counter() - begin))
    result |= {"ms": times, "ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
               "peak_mib": torch.cuda.max_memory_allocated(device) / MIB if cuda else None,
               "compute_dtype": str(model.manual_cast_dtype or model.get_dtype()),
               "finite": bool(torch.isfinite(out).all())}
    torch.save(out.float().cpu(), spec["output"])
    if spec.get("profile"):
        profile_step(model, inp, Path(spec["profile"]), sync)
    return result


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
