"""Shared plumbing: repository paths, the ComfyUI host, machine facts, interleaved timing, child processes."""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
RESULTS = REPO / "bench" / "results"
THREADS = 2
GIB = 1024**3


def setup_torch() -> None:
    """Fixed thread count and no autograd: every figure is measured under the same settings."""
    torch.set_num_threads(THREADS)
    torch.set_grad_enabled(False)


def boot_host(cpu: bool = True) -> Path:
    """Materialise and boot ComfyUI in this process (--cpu unless `cpu` is False); returns its folder. The host is
    COMFY_HOST's (default 0.3.75), in FP8-device mode where COMFY_FP8_DEVICE=1 (tools/comfy_host.py)."""
    from tools import comfy_host

    comfy_host.activate_overlay(CACHE, comfy_host.host_version())
    comfy_dir = comfy_host.materialise(CACHE)
    comfy_host.boot(comfy_dir, cpu=cpu)
    return comfy_dir


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu, "cores": os.cpu_count(), "threads_used": THREADS, "ram_gib": round(mem / GIB, 1),
        "os": platform.platform(), "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg()[0],
    }


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("optimum.quanto", "safetensors", "diffusers"):
        try:
            module = __import__(name, fromlist=["__version__"])
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = None
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per round of each function, run round-robin so background load hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in times.items()}


def round_ratios(numerator: list[float], denominator: list[float], minus: float = 0.0) -> dict[str, float]:
    """numerator / denominator (- `minus`) of each round: its median (what a goal is judged on) and spread."""
    ratios = [n / d - minus for n, d in zip(numerator, denominator, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def run_child(module: str, *args: str | Path, **env: str) -> dict:
    """`python -m module args` in a fresh interpreter at the repository root, `env` added; its last line's JSON."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, **env))
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(map(str, args))} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def process_status(field: str) -> int | None:
    """A size this process's /proc/self/status gives (VmRSS, VmHWM: its peak, RssAnon), in bytes; None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0; nothing elsewhere)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rel_err(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference|| / ||reference||, in float64."""
    ref = reference.double()
    return float((approx.double() - ref).norm() / ref.norm())


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
