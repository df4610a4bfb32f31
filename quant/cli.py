"""python -m sd35_fp8.quant convert IN OUT [options] | python -m sd35_fp8.quant inspect FILE

For people who prepare FP8 files outside ComfyUI. The output is ComfyUI's native quantized
layout: stock ComfyUI's Load Diffusion Model / Load Checkpoint read it, and so do our loaders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .budget import auto_budget, parse_budget, sampling_bytes
from .checkpoint import FREE_MEMORY, LAYOUTS, STOCK_FORMAT, inspect_file, save_quantized, to_stock_layout
from .config import BACKENDS, PRESETS, QuantConfig
from .formats import FP8_DTYPES, SCALINGS
from .hardware import host_memory
from .plan import CHECKPOINT_MODEL_PREFIX, LOADER_TEXT_ENCODER_CHOICES
from .streaming import quantize_safetensors_stream

NEED_LESS = f"{FREE_MEMORY}. To need less: a smaller --budget, or none; --text-encoders all"


def _progress_bar(label: str):
    state: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=label, unit="tensor", file=sys.stderr)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()

    return update


def _format_and_scaling(args: argparse.Namespace) -> tuple[str, str]:
    """stock_compatible quantizes straight to what stock ComfyUI runs natively (one e4m3 scale per layer);
    auto defaults to per-channel e4m3, the lowest error, read by this pack and ComfyUI 0.3.75."""
    if args.layout == "stock_compatible":
        if args.backend == "quanto":
            raise ValueError("--backend quanto writes per-channel scales, which stock ComfyUI 0.8+ does not run "
                             "natively: add --layout auto")
        if args.scaling not in (None, "per_tensor") or args.format not in (None, STOCK_FORMAT):
            raise ValueError(f"--layout stock_compatible writes per_tensor {STOCK_FORMAT} layers; for "
                             f"--scaling {args.scaling} --format {args.format} use --layout auto")
        return STOCK_FORMAT, "per_tensor"
    return args.format or STOCK_FORMAT, args.scaling or "per_channel"


def _budget(text: str | None) -> int | None:
    """--budget in bytes; auto: the nodes' rule (quant.budget.auto_budget) on this machine's free GPU memory, else
    its available RAM, with ComfyUI's sampling estimate for that device (sampling_bytes)."""
    value = parse_budget(text, "--budget")
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return auto_budget(torch.cuda.mem_get_info()[0], sampling_bytes(on_gpu=True), torch.cuda.get_device_name())
    if not (available := host_memory("MemAvailable")):
        raise ValueError("--budget auto: no GPU and no /proc/meminfo to read this machine's free memory from; give "
                         "the budget in GiB, e.g. --budget 10.5")
    return auto_budget(available, sampling_bytes(on_gpu=False), "this machine's RAM (no GPU)")


def convert(args: argparse.Namespace) -> int:
    fp8_format, scaling = _format_and_scaling(args)
    config = QuantConfig(fp8_format=fp8_format, scaling=scaling, protect_preset=args.preset,
                         protect_patterns=tuple(args.protect or ()), backend=args.backend,
                         memory_budget=_budget(args.budget))
    sd, formats, report = quantize_safetensors_stream(args.input, config, model_prefix=CHECKPOINT_MODEL_PREFIX,
                                                      text_encoders=args.text_encoders,
                                                      progress=_progress_bar("quantizing"), input_name="input",
                                                      memory_advice=NEED_LESS)
    metadata = {"sd35_fp8.source": Path(args.input).name, "sd35_fp8.rule": report.rule,
                "sd35_fp8.fp8_format": fp8_format, "sd35_fp8.scaling": scaling, "sd35_fp8.layout": args.layout}
    # layer names in the metadata are relative to the diffusion model, in all-in-one files too
    prefix = CHECKPOINT_MODEL_PREFIX if any(k.startswith(CHECKPOINT_MODEL_PREFIX) for k in sd) else ""
    if args.layout == "stock_compatible":  # layers that arrived in FP8 with per-channel or e5m2 scales
        to_stock_layout(sd, formats, prefix)
    out = save_quantized(args.output, sd, formats, metadata=metadata, overwrite=args.overwrite, model_prefix=prefix)
    print(report.to_text(max_layers=args.max_layers))
    print(f"wrote {out}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    print(json.dumps(inspect_file(args.file), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sd35_fp8.quant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="quantize a .safetensors checkpoint to FP8")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--preset", default="auto", choices=PRESETS)
    conv.add_argument("--layout", default="stock_compatible", choices=LAYOUTS,
                      help="stock_compatible (default): per-tensor float8_e4m3fn, which every ComfyUI runs natively "
                           "(0.8+ on FP8 GPUs included). auto: --format/--scaling as given (per-channel by default), "
                           "read by this pack and ComfyUI 0.3.75")
    conv.add_argument("--format", default=None, choices=sorted(FP8_DTYPES), help="default float8_e4m3fn")
    conv.add_argument("--scaling", default=None, choices=SCALINGS,
                      help="default per_tensor with --layout stock_compatible, per_channel with --layout auto")
    conv.add_argument("--protect", action="append", metavar="PATTERN",
                      help="extra layer to keep 16-bit (glob or re:regex); repeatable")
    conv.add_argument("--text-encoders", default="none", choices=list(LOADER_TEXT_ENCODER_CHOICES),
                      help="all-in-one checkpoints: text encoders to store in FP8. Default none: stock ComfyUI "
                           "reads FP8 text encoders only from separate files, our loader reads both")
    conv.add_argument("--backend", default="native", choices=BACKENDS,
                      help="quanto: optimum-quanto's qfloat8 weights (per_channel; needs the [quanto] extra) "
                           "written in the same layout, for comparison with native")
    conv.add_argument("--budget", default=None, metavar="GIB|auto",
                      help="fit the diffusion model's weights in this many GiB (e.g. 10.5), keeping 16-bit the layers "
                           "where 16-bit buys the most; auto: this machine's free GPU memory (else RAM) after sampling "
                           "at 1024x1024 by ComfyUI's estimate, and a margin. Default: the preset decides")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    conv.add_argument("--max-layers", type=int, default=20, help="layers listed in the printed report")
    conv.set_defaults(func=convert)
    insp = sub.add_parser("inspect", help="summarise a checkpoint's tensors, dtypes and FP8 layout")
    insp.add_argument("file")
    insp.set_defaults(func=inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, MemoryError) as err:  # each names its file and what to do
        print(f"error: {err}", file=sys.stderr)
        return 2
