"""Section 3, streaming load: wall time and peak RSS to load a full-size Medium checkpoint, one process per load.

A float16 transformer-only checkpoint (ComfyUI key layout, Gaussian weights) is written tensor by tensor to a
temporary folder (full: depth 24, 4.9 GB; quick: depth 4, full width). Then each of bench.load_child's modes (our
loader path, the stream quantize alone, ComfyUI's own FP16 load, a plain read of our saved FP8 file and of the FP16
file) runs in a fresh process. The measured loads alternate over several rounds; a time ratio is the median of the
rounds' ratios, with their spread. Peak RSS is reported net of the process's RSS before
the load (interpreter, torch, ComfyUI imports). Files are read warm from the page cache (read through once just
before each measured load).
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

from . import models
from .common import log, round_ratios, run_child
from .weights import draw


def write_checkpoint(path: Path, variant: str, depth: int) -> int:
    """Write the variant's float16 state dict to `path`, one tensor in memory at a time; returns the file size.

    A reduced depth keeps the first `depth` blocks of the full-size model (ComfyUI then builds all blocks
    and leaves the missing ones uninitialised: untouched memory, not counted in RSS)."""
    shapes = {k: tuple(v.shape) for k, v in models.meta_model(variant).state_dict().items()
              if not k.startswith("joint_blocks.") or int(k.split(".")[1]) < depth}
    header: dict = {"__metadata__": {"modelspec.title": f"bench {variant} depth {depth} (random weights)"}}
    offset = 0
    for key, shape in shapes.items():
        end = offset + 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape in shapes.items():
            f.write(draw(key, shape, "gaussian").half().contiguous().numpy().tobytes())
    return path.stat().st_size


def _warm(path: Path) -> None:
    """Read `path` into the page cache, so each measured load reads it warm (this VM's kernel reclaims idle page
    cache within minutes: a load that found the file evicted measured the disk, 2-6x slower)."""
    buffer = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def _net(r: dict) -> int:
    return r["peak_rss"] - r["rss_before"]


def run(quick: bool, workdir: str | None = None) -> dict:
    variant = "sd35_medium"
    depth = 4 if quick else models.depth_of(variant)
    with tempfile.TemporaryDirectory(prefix="bench-load-", dir=workdir) as tmp:
        fp16, fp8 = (Path(tmp) / f"{variant}_{kind}.safetensors" for kind in ("fp16", "fp8"))
        log(f"load: writing a {variant} depth-{depth} FP16 checkpoint")
        size = write_checkpoint(fp16, variant, depth)
        runs = {}
        for mode, *args in (("imports",), ("comfy_imports",), ("save_fp8", fp16, fp8)):
            log(f"load: {mode}")
            runs[mode] = run_child("bench.load_child", mode, *args)
        # the loads alternate, round by round
        measured = {"ours_model": ("ours_model", fp16), "comfy_fp16": ("comfy_fp16", fp16),
                    "ours_stream": ("ours_stream", fp16), "read_fp8": ("read", fp8), "read_fp16": ("read", fp16)}
        rounds: dict[str, list[dict]] = {name: [] for name in measured}
        for i in range(2 if quick else 5):  # quick: the others in the first round only
            names = [n for n in measured if not quick or i == 0 or n in ("ours_model", "comfy_fp16")]
            log(f"load: round {i + 1}: {', '.join(names)}")
            for name in names:
                mode, file = measured[name]
                _warm(file)
                rounds[name].append(run_child("bench.load_child", mode, file))
        fp8_size = fp8.stat().st_size
    for mode, results in rounds.items():  # the median round of each (its peak RSS with it)
        runs[mode] = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]
    seconds = {mode: [r["seconds"] for r in results] for mode, results in rounds.items()}
    time_ratio = round_ratios(seconds["ours_model"], seconds["comfy_fp16"])
    read_ratio = round_ratios(seconds["read_fp8"], seconds["read_fp16"])
    return {
        "variant": variant, "depth": depth, "fp16_file_bytes": size, "fp8_file_bytes": fp8_size,
        "fp8_file_over_fp16_file": fp8_size / size,
        "peak_rss_over_fp16_file": _net(runs["ours_model"]) / size,
        "stream_only_peak_rss_over_fp16_file": _net(runs["ours_stream"]) / size,
        "comfy_fp16_peak_rss_over_fp16_file": _net(runs["comfy_fp16"]) / size,
        "peak_anon_over_fp16_file": {m: (runs[m]["peak_anon"] - runs[m]["anon_before"]) / size
                                     for m in ("ours_model", "ours_stream", "comfy_fp16")},
        "ours_model_over_comfy_time": time_ratio["median"], "fp8_over_fp16_time": read_ratio["median"],
        "spread": {"ours_model_over_comfy_time": time_ratio, "fp8_over_fp16_time": read_ratio},
        "seconds": {m: r["seconds"] for m, r in runs.items() if m != "save_fp8"},
        "net_peak_rss": {m: _net(r) for m, r in runs.items() if "imports" not in m and m != "save_fp8"},
        "baseline_peak_rss": {m: runs[m]["peak_rss"] for m in ("imports", "comfy_imports")},
        "model_bytes": {m: runs[m].get("bytes") for m in ("ours_model", "comfy_fp16")},
        "note": "peak RSS net of the process's RSS before the load; files read warm from the page cache (read through "
                "just before each load); seconds: each path's median round",
    }
