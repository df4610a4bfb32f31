"""Section 4, CPU step time: one denoiser forward of full-width SD3.5 Medium, the variants side by side.

fp32 reference, ours (weight_only: FP8 weights dequantized to float32 in forward), ComfyUI's fp8 cast
(manual_cast: FP8 weights cast to float32 in forward) and quanto qfloat8, all on the same `student_t`
weights and inputs, all held at once (the FP8 variants share every tensor they do not replace; quanto is built
first, its build being the section's peak) and run round-robin, fp32 first in every round; each ratio is the
median of the rounds' ratios, with its spread. Quick mode runs 2 blocks, full mode all 24 where the memory the
section is predicted to take (`_need`, from measured factors) fits what the machine has available, else the deepest
that fits: the JSON says which depth ran and why (`depth_reason`), with the prediction and the peak RSS measured
per stage (`memory`).

`python -m bench.step --plan` prints the depth chosen for this machine's free memory and for an idle 24 GiB one;
`python -m bench.step --depth 4` runs one measurement (the factors below are refitted from its `memory.stages`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os

import psutil

from . import models, weights
from .common import GIB, interleaved, log, medians, process_status, rel_err, reset_peak_rss, round_ratios

VARIANT = "sd35_medium"
BUDGET_ENV = "BENCH_STEP_MEMORY_GIB"  # set: the memory the section may take, instead of what is available

# What the section holds, in bytes, measured on this code's build order (fp32 reference, its pos_embed cache dropped,
# then quanto, ours, comfy_cast; then the forwards): peak RSS per stage (VmHWM, reset through /proc/self/clear_refs
# before each) net of the process before the reference, one fresh process per depth, Medium at depths 2, 3, 4 and 5
# at 512px and depth 2 at 1024px, then `make bench`'s own step at depth 4; torch 2.14.1 CPU, glibc malloc,
# 2026-12-07. n = all parameters, c = the 2-D weights of the joint blocks (what the FP8 variants quantize; 2.47 G and
# 2.22 G at depth 24). The per-parameter slopes are the tensors' own bytes; each constant is the largest residual
# seen, rounded up (they spread over 0.3 GB from run to run, with no steady trend in depth):
# - reference: fp32 weights (4 n); while drawn, + 1.1 GB (the float32 pos_embed table, 0.9 GB, and the draws)
# - quanto's build (the peak from depth 4 on): + 5 c + 1.0 GB. It clones every weight it quantizes (4 c, for its
#   report's error) and writes the FP8 weights (1 c); the freed clones stay in the heap, where ours and comfy_cast
#   are built next, which is why quanto goes first. The old order (quanto last, the pos_embed cache kept) peaked
#   at 7.3 GB at depth 4 against 5.2 now, growing 13.6 bytes per c: 32 GB at depth 24, killed by the kernel at 24
# - all four held: 5 n + 2 c + 0.85 GB (FP8: ours 1 c, comfy_cast 1 n, quanto 1 c; heap kept from the builds)
# - a forward's temporaries: 0.35 GB + 210 bytes x tokens^2 (24 heads' float32 attention scores and softmax,
#   2 x 24 x 4 bytes, plus the rest): 0.6 GB at 512px (1178 tokens), 4.1 GB at 1024px (4250)
# At depth 24 that is 22.0 GB (quanto's build) over the process, 18.3 GB while timing: full depth wants ~25.3 GB free.
REF_PEAK = 1.1e9
QUANTO_BYTES, QUANTO_CONST = 5, 1.0e9
HELD_PER_N, HELD_PER_C, HELD_CONST = 5, 2, 0.85e9
FWD_CONST, FWD_PER_TOKEN_SQ = 0.35e9, 210
MARGIN, MARGIN_BYTES = 1.10, GIB  # prediction x 1.1 + 1 GiB must fit what is available


def _params(depth: int) -> tuple[int, int]:
    """(all parameters, the joint blocks' 2-D weights) of Medium with `depth` blocks, from the meta device."""
    sd = models.meta_model(VARIANT, depth).state_dict()
    return (sum(t.numel() for t in sd.values()),
            sum(t.numel() for k, t in sd.items() if k.startswith("joint_blocks.") and t.dim() == 2))


def _need(depth: int, pixels: int) -> float:
    """Bytes the section's peak RSS grows by over the process it starts in (the measured factors above)."""
    n, c = _params(depth)
    tokens = (pixels // 16) ** 2 + models.CONTEXT_TOKENS
    ref = 4 * n
    return max(ref + REF_PEAK, ref + QUANTO_BYTES * c + QUANTO_CONST,
               HELD_PER_N * n + HELD_PER_C * c + HELD_CONST + FWD_CONST + FWD_PER_TOKEN_SQ * tokens**2)


def _fits(depth: int, pixels: int, available: float) -> bool:
    return _need(depth, pixels) * MARGIN + MARGIN_BYTES <= available


def _available() -> tuple[float, str]:
    """Bytes the section may take: BENCH_STEP_MEMORY_GIB if set, else what the machine has available now."""
    if os.environ.get(BUDGET_ENV):
        return float(os.environ[BUDGET_ENV]) * GIB, BUDGET_ENV
    _release()
    return float(psutil.virtual_memory().available), "available"


def choose_depth(full: int, pixels: int, available: float) -> tuple[int, str]:
    """The deepest of full..2 blocks whose predicted peak (x 1.1 + 1 GiB) fits `available`, and why."""
    gib = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
    limit = f"{gib(available)} available (needs the prediction x {MARGIN} + {gib(MARGIN_BYTES)})"
    if _fits(full, pixels, available):
        return full, f"all {full} blocks: predicted peak {gib(_need(full, pixels))} fits {limit}"
    depth = next((d for d in range(full - 1, 1, -1) if _fits(d, pixels, available)), 2)
    fits = "the deepest that fits" if _fits(depth, pixels, available) else "the least it runs, and it may not fit"
    return depth, (f"{depth} of {full} blocks: {full} would peak at {gib(_need(full, pixels))}, over {limit}; "
                   f"{depth} ({gib(_need(depth, pixels))}) is {fits}")


def _release() -> None:
    """Collect, and give the heap's free pages back to the system (glibc), so what is available counts them."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Memory:
    """Peak RSS of each stage (VmHWM, reset between stages) and RSS after it, net of the RSS at the start."""

    def __init__(self) -> None:
        _release()
        reset_peak_rss()
        self.start = process_status("VmRSS")
        self.stages: dict[str, dict[str, float]] = {}

    def mark(self, stage: str) -> None:
        gc.collect()
        rss, peak = process_status("VmRSS"), process_status("VmHWM")
        if None not in (self.start, rss, peak):
            self.stages[stage] = {"peak_gib": round((peak - self.start) / GIB, 3),
                                  "held_gib": round((rss - self.start) / GIB, 3)}
        reset_peak_rss()

    def summary(self, predicted: float) -> dict:
        peak = max((s["peak_gib"] for s in self.stages.values()), default=None)
        return {"predicted_peak_gib": round(predicted / GIB, 3), "peak_gib": peak,
                "rss_at_start_gib": None if self.start is None else round(self.start / GIB, 3), "stages": self.stages}


def measure(depth: int, pixels: int, repeats: int) -> dict:
    mem = _Memory()
    ref = models.reference(VARIANT, depth, "student_t")
    weights.sincos_pos_embed.cache_clear()  # a float32 copy of pos_embed (0.9 GB at Medium's size) the step needs not
    mem.mark("reference")
    inp = models.inputs(pixels)
    built = {"quanto": models.quanto(ref)}  # first: its build's transient peak is the section's (see the factors)
    mem.mark("quanto")
    built["fp8_weight_only"] = models.ours(ref)
    mem.mark("fp8_weight_only")
    built["comfy_cast"] = models.comfy_cast(ref, VARIANT, depth)
    mem.mark("comfy_cast")
    # timed in the same order as ever: fp32 first in every round
    variants = {"fp32": ref, **{name: built[name] for name in ("fp8_weight_only", "comfy_cast", "quanto")}}
    outputs = {name: models.forward(m, inp) for name, m in variants.items()}  # also the warm-up round
    times = interleaved({name: functools.partial(models.forward, m, inp) for name, m in variants.items()},
                        repeats, warmup=0)
    mem.mark("forwards")
    ratios = {name: round_ratios(ts, times["fp32"]) for name, ts in times.items() if name != "fp32"}
    result = {
        "depth": depth, "pixels": pixels, "image_tokens": (pixels // 16) ** 2, "context_tokens": models.CONTEXT_TOKENS,
        "repeats": repeats, "seconds": medians(times),
        **{f"{name}_over_fp32": r["median"] for name, r in ratios.items()}, "spread": ratios,
        "rel_err": {name: rel_err(outputs["fp32"], out) for name, out in outputs.items() if name != "fp32"},
        "memory": mem.summary(_need(depth, pixels)),
    }
    del ref, built, variants, outputs
    _release()
    return result


def run(quick: bool) -> dict:
    full = 2 if quick else models.depth_of(VARIANT)
    pixels = 256 if quick else 512
    available, source = _available()
    depth, why = choose_depth(full, pixels, available)
    if quick:
        why = (f"quick mode: {depth} of {models.depth_of(VARIANT)} blocks (predicted peak "
               f"{_need(depth, pixels) / GIB:.1f} GiB, {available / GIB:.1f} GiB available)")
    log(f"step: {VARIANT} depth {depth} at {pixels}x{pixels}: {why}")
    out = {"variant": VARIANT, "weights": "student_t", **measure(depth, pixels, repeats=3 if quick else 5),
           "full_depth": models.depth_of(VARIANT), "depth_reason": why,
           "memory_available_gib": round(available / GIB, 1), "memory_available_from": source}
    if not quick:
        available, _ = _available()
        if _fits(2, 1024, available):
            log(f"step: {VARIANT} depth 2 at 1024x1024 (token-count dependence)")
            out["at_1024px_depth2"] = measure(2, 1024, repeats=3)
        else:
            out["at_1024px_depth2_skipped"] = (f"predicted peak {_need(2, 1024) / GIB:.1f} GiB does not fit "
                                               f"{available / GIB:.1f} GiB available")
            log(f"step: at 1024px skipped: {out['at_1024px_depth2_skipped']}")
    return out


def main(argv: list[str] | None = None) -> None:
    from .common import boot_host, setup_torch

    parser = argparse.ArgumentParser(description="section 4 alone: --plan, or one measurement at --depth")
    parser.add_argument("--plan", action="store_true",
                        help="print the predicted peak per depth and the depth chosen for this machine and 24 GiB")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--pixels", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    setup_torch()
    boot_host()
    with contextlib.suppress(ImportError):
        import optimum.quanto  # noqa: F401  (imported before the section, as bench.run's versions() does)
    if args.plan:
        full = models.depth_of(VARIANT)
        for depth in (2, 4, 8, 12, 16, 18, 19, 20, 22, full):
            print(f"depth {depth:2d}: predicted peak {_need(depth, args.pixels) / GIB:5.1f} GiB at {args.pixels}px")
        # an idle 24 GiB machine: 23.5 GiB of RAM, ~0.7 GiB the system's, ~1.5 GiB the bench process's own
        for label, avail in {"this machine now": _available()[0], "24 GiB machine, idle": 21.3 * GIB}.items():
            print(f"{label} ({avail / GIB:.1f} GiB): depth %d: %s" % choose_depth(full, args.pixels, avail))
        return
    print(json.dumps(measure(args.depth, args.pixels, args.repeats)))


if __name__ == "__main__":
    main()
