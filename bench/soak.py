"""Soak: many quantize + sample prompts in ONE real ComfyUI server process; does memory stay flat?

    python -m bench.soak --prompts 50 [--warmup 5] [--json bench/results/soak.json]

One `main.py` server runs on a loopback port with a temporary base folder that links the tiny SD3.5
fixtures. Each prompt is sent over HTTP after the previous one finished, and each makes new FP8 models:
our diffusion-model loader reads and quantizes the transformer file, and Quantize Model makes an FP8
copy of the cached checkpoint's model; both are sampled (2 steps) and one is decoded to an image.
A comment line in protect_patterns (changes nothing in the result) makes ComfyUI run those nodes again
instead of answering from its cache, as a user changing settings would.

After each prompt:
- RSS of the server process, read from outside (psutil);
- live tensors in the server: a probe route (`/sd35_fp8_soak/probe`, a throwaway custom node written into
  the temporary base folder only, never part of the pack) runs gc.collect() and counts the torch.Tensor
  objects gc can see, and the bytes of their distinct storages. Counting inside the server measures the
  process that would leak, under the real executor and its caches, which an in-process copy would not.

rss_growth_ratio = RSS after the last prompt / RSS after the warm-up prompts (goal <= 1.05); tensor_growth
and tensor_mb_growth are the same differences for the live tensors. A leak of every quantized model shows
in the tensor figures at once (dozens of tensors and ~2 MB per prompt on the tiny fixtures), long before
RSS, which the 0.4 GB of CLIP-L and VAE in the checkpoint dominate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from tools import comfy_host, tiny_sd35

from .common import CACHE, REPO, machine, now

PROBE_ROUTE = "/sd35_fp8_soak/probe"
PROBE_SOURCE = f'''"""Soak probe (written by bench/soak.py into a temporary base folder): live tensors."""
import gc

import torch
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {{}}


@PromptServer.instance.routes.get("{PROBE_ROUTE}")
async def probe(request):
    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    storages = {{}}
    for t in tensors:
        try:
            storage = t.untyped_storage()
            storages[(storage.device.type, storage.data_ptr())] = storage.nbytes()
        except Exception:
            continue
    return web.json_response({{"tensors": len(tensors), "tensor_bytes": sum(storages.values())}})
'''


def soak_prompt(index: int, ckpt_name: str, transformer_name: str, steps: int = 2) -> dict:
    """One quantize + sample prompt; `index` makes ComfyUI run the FP8 nodes again (a comment line)."""
    quant = {"fp8_format": "float8_e4m3fn", "scaling": "per_channel", "protect_preset": "auto", "compute": "auto",
             "protect_patterns": f"# soak prompt {index}"}

    def sampler(model: list) -> dict:
        return {"class_type": "SD35FP8Sampler", "inputs": {
            "model": model, "positive": ["p", 0], "negative": ["n", 0], "latent_image": ["lat", 0], "seed": index,
            "preset": "custom", "steps": steps, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform",
            "shift": 3.0, "denoise": 1.0}}

    return {
        "ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "p": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ck", 1], "text": "a red fox in the snow"}},
        "n": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ck", 1], "text": "blurry"}},
        "lat": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ld": {"class_type": "SD35FP8DiffusionModelLoader", "inputs": {"model_name": transformer_name, **quant}},
        "q": {"class_type": "SD35FP8QuantizeModel", "inputs": {"model": ["ck", 0], **quant}},
        "s_ld": sampler(["ld", 0]),
        "s_q": sampler(["q", 0]),
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["s_q", 0], "vae": ["ck", 2]}},
        "img": {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}},
        "stats": {"class_type": "PreviewAny", "inputs": {"source": ["s_ld", 1]}},
    }


def _http(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read()[:2000]!r}") from None


def _run_one(url: str, prompt: dict, timeout: float = 300) -> str:
    """Queue a prompt, wait for it; returns the status ("success" or "error: ...")."""
    prompt_id = _http(url + "/prompt", {"prompt": prompt, "client_id": "soak"})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = _http(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            if entry["status"]["status_str"] == "success":
                return "success"
            errors = [d.get("exception_message") for e, d in entry["status"]["messages"] if e == "execution_error"]
            return f"error: {errors}"
        time.sleep(0.05)
    return "error: timeout"


def run(n_prompts: int = 50, warmup: int = 5, comfy_dir: str | Path | None = None,
        checkpoint: str | Path | None = None, transformer: str | Path | None = None, log=None) -> dict:
    """Soak one server with `n_prompts` quantize + sample prompts; returns the per-prompt series and ratios."""
    comfy_dir = Path(comfy_dir) if comfy_dir else comfy_host.materialise(CACHE)
    if checkpoint is None or transformer is None:  # the tiny SD3.5 Large fixtures, built if missing
        out = CACHE / "fixtures"
        tiny_sd35.build_in_subprocess(comfy_dir, out)
        checkpoint, transformer = out / "tiny_sd35_large.safetensors", out / "tiny_sd35_large_transformer.safetensors"
    warmup = max(1, min(warmup, n_prompts - 1))
    with tempfile.TemporaryDirectory(prefix="sd35_fp8_soak_") as tmp:
        base = comfy_host.make_base_dir(Path(tmp) / "base", REPO)
        ckpt_name = comfy_host.link_model(base, "checkpoints", checkpoint)
        transformer_name = comfy_host.link_model(base, "diffusion_models", transformer)
        probe = base / "custom_nodes" / "sd35_fp8_soak_probe"
        probe.mkdir()
        (probe / "__init__.py").write_text(PROBE_SOURCE)
        server = comfy_host.ServerProcess(comfy_dir, base, Path(tmp) / "server.log").start()
        try:
            process = psutil.Process(server.proc.pid)
            rss, tensors, tensor_bytes, seconds, statuses = [], [], [], [], []
            for index in range(n_prompts):
                start = time.perf_counter()
                statuses.append(_run_one(server.url, soak_prompt(index, ckpt_name, transformer_name)))
                seconds.append(time.perf_counter() - start)
                probe_reading = _http(server.url + PROBE_ROUTE)
                rss.append(process.memory_info().rss)
                tensors.append(probe_reading["tensors"])
                tensor_bytes.append(probe_reading["tensor_bytes"])
                if log:
                    log(index, rss[-1], tensors[-1], tensor_bytes[-1], seconds[-1], statuses[-1])
            alive = server.proc.poll() is None
        finally:
            server.stop()
    base_index = warmup - 1
    return {
        "n_prompts": n_prompts, "warmup": warmup, "rss_growth_ratio": round(rss[-1] / rss[base_index], 4),
        "rss_mb": [round(r / 2**20, 1) for r in rss], "live_tensors": tensors,
        "tensor_mb": [round(b / 2**20, 3) for b in tensor_bytes], "tensor_growth": tensors[-1] - tensors[base_index],
        "tensor_max_growth": max(tensors[base_index:]) - tensors[base_index],
        "tensor_mb_growth": round((tensor_bytes[-1] - tensor_bytes[base_index]) / 2**20, 3),
        "seconds_per_prompt_median": round(statistics.median(seconds), 3),
        "failed": sum(s != "success" for s in statuses), "errors": sorted({s for s in statuses if s != "success"}),
        "server_alive_at_end": alive,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50, help="consecutive prompts (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="prompts before the RSS baseline (default 5)")
    parser.add_argument("--json", type=Path, default=None, help='write {"soak": {...}} to this file')
    args = parser.parse_args(argv)

    print(f"{'prompt':>6} {'RSS MB':>9} {'tensors':>8} {'tensor MB':>10} {'seconds':>8}  status")

    def log(index, rss, tensors, tensor_bytes, seconds, status):
        print(f"{index + 1:>6} {rss / 2**20:>9.1f} {tensors:>8} {tensor_bytes / 2**20:>10.2f} {seconds:>8.2f}  "
              f"{status}", flush=True)

    result = run(args.prompts, args.warmup, log=log)
    print(f"\nrss_growth_ratio {result['rss_growth_ratio']} (RSS after prompt {result['warmup']} -> after "
          f"prompt {result['n_prompts']}; goal <= 1.05)")
    print(f"live tensors {result['live_tensors'][result['warmup'] - 1]} -> {result['live_tensors'][-1]} "
          f"(growth {result['tensor_growth']}, {result['tensor_mb_growth']} MB); failed prompts: {result['failed']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"soak": {**result, "machine": machine(), "date": now()}}, indent=1))
        print(f"wrote {args.json}")
    return 0 if result["failed"] == 0 and result["server_alive_at_end"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
