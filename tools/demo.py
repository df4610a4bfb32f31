"""`make demo`: the txt2img and FP16-vs-FP8 A/B workflows through the real ComfyUI, then a short report.

Uses your SD3.5 checkpoint when one is configured (SD35_CHECKPOINT=/path/to/sd3.5_large.safetensors) or
present in ./models/checkpoints/ under an official name; otherwise the tiny random-weight SD3.5-architecture
checkpoint that the tests use (and says so: its images are noise-like textures, the numbers are real).
Images land in demo-output/output/.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from tools import comfy_host, tiny_sd35

REPO = Path(__file__).resolve().parents[1]

OFFICIAL = ("sd3.5_large.safetensors", "sd3.5_medium.safetensors", "sd3.5_large_turbo.safetensors")


def find_checkpoint() -> Path | None:
    configured = os.environ.get("SD35_CHECKPOINT")
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            sys.exit(f"SD35_CHECKPOINT={configured} does not exist")
        return path
    candidates = (REPO / "models" / "checkpoints" / name for name in OFFICIAL)
    return next((path for path in candidates if path.is_file()), None)


class HostLog(logging.Handler):
    """ComfyUI's own log goes to a file, not the terminal: its warnings about its built-in nodes (the audio nodes
    need torchaudio, which the pack does not use and the venv does not install) are the host's, not the demo's
    result. The summary names what the host could not import and where its log is."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = logging.FileHandler(path, mode="w")
        self.file.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        self.failed: list[str] = []
        self.missing: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.file.emit(record)
        msg = record.getMessage()
        self.failed += re.findall(r"IMPORT FAILED: (\S+)", msg)
        self.missing |= set(re.findall(r"No module named '([\w.]+)'", msg))

    def summary(self) -> str:
        where = f"host log: {self.path.relative_to(REPO)}"
        if not self.failed:
            return f"ComfyUI: all its built-in nodes imported ({where})"
        missing = f" ({', '.join(sorted(self.missing))} not installed)" if self.missing else ""
        return (f"ComfyUI: its built-in {', '.join(self.failed)} did not import{missing}; not used by this pack or "
                f"the demo\n  {where}")


def main() -> int:
    host_log = HostLog(REPO / "demo-output" / "comfyui.log")
    root = logging.getLogger()
    root.handlers[:] = [host_log]  # before ComfyUI is imported: its messages go to the file only
    root.setLevel(logging.INFO)
    comfy_dir = comfy_host.materialise(REPO / ".cache")
    ckpt = find_checkpoint()
    tiny = ckpt is None
    if tiny:
        fixtures = REPO / ".cache" / "fixtures"
        ckpt = fixtures / tiny_sd35.build_in_subprocess(comfy_dir, fixtures)["files"]["large"]["all_in_one"]
    old_link = REPO / "demo-output" / "custom_nodes" / "sd35_fp8"  # older demos linked the pack under this name:
    if old_link.is_symlink():  # with both links, ComfyUI would load the pack twice
        old_link.unlink()
    base = comfy_host.make_base_dir(REPO / "demo-output", REPO)  # the name `make serve` and the tests use
    name = comfy_host.link_model(base, "checkpoints", ckpt)
    comfy_host.boot(comfy_dir, base)
    comfy_host.load_nodes()
    runner = comfy_host.PromptRunner()

    def run(workflow: str) -> tuple[dict, float]:
        start = time.perf_counter()
        graph = json.loads((REPO / "workflows" / "api" / f"{workflow}.json").read_text())
        for node in graph.values():
            if "ckpt_name" in node["inputs"]:
                node["inputs"]["ckpt_name"] = name
            if tiny and node["class_type"] == "EmptySD3LatentImage":  # the tiny model's images are textures at any size
                node["inputs"]["width"] = node["inputs"]["height"] = 128
        return runner.run(graph), time.perf_counter() - start

    txt2img, txt2img_s = run("sd35_fp8_txt2img")
    model, _, _, report = runner.node_outputs("loader")
    stats = runner.node_outputs("sampler")[1]
    ab, ab_s = run("sd35_fp8_ab_compare")
    ssim, psnr, _, _ = runner.node_outputs("compare")

    images = [base / "output" / img["subfolder"] / img["filename"]
              for out in (txt2img, ab) for node in out.values() for img in node.get("images", [])
              if img.get("type") == "output"]
    data = model.model_options["sd35_fp8"]["report"]  # the loader's report as data
    before, after = data["bytes_before"], data["bytes_after"]
    print("\n=== SD3.5 FP8 demo ===")
    if tiny:
        print("Model: TINY RANDOM-WEIGHT SD3.5-architecture checkpoint (no real weights here; set SD35_CHECKPOINT "
              "or put sd3.5_large.safetensors in models/checkpoints/ for real images). Its images are textures "
              "and its FP8-vs-FP16 scores say nothing about real models (see the README's benchmarks); the "
              "numbers are real measurements of this tiny model.")
    else:
        print(f"Model: {ckpt}")
    print(f"Diffusion model weights: {before / 2**20:.1f} MiB as stored -> {after / 2**20:.1f} MiB FP8 "
          f"({after / before:.3f}x)")
    print(f"  rule: {data['rule']}")
    print("  " + next(line for line in report.splitlines() if line.startswith("layers:")))  # the text's summary
    print(f"txt2img: {txt2img_s:.1f} s wall; sampler: {stats.splitlines()[1]}")
    print(f"A/B FP16 vs FP8 (same seed): SSIM {ssim:.4f}, PSNR {psnr:.2f} dB ({ab_s:.1f} s wall)")
    print(host_log.summary())
    print("Images:")
    for path in images:
        print(f"  {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
