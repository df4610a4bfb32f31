"""The issue's goals checked against a results dict: figure, target, pass/fail (None if not measured)."""

from __future__ import annotations

from collections.abc import Callable
from operator import ge, le


def _get(results: dict, path: str):
    node = results
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _goal(text: str, value: float | None, target: float, ok: Callable[[float, float], bool]) -> dict:
    return {"goal": text, "value": value, "target": target, "pass": None if value is None else bool(ok(value, target))}


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def evaluate(results: dict) -> dict[str, dict]:
    g = lambda path: _get(results, path)  # noqa: E731
    return {
        "memory_large": _goal("ours/FP16 bytes, Large <= 0.51", g("memory.sd35_large.ratio"), 0.51, le),
        "memory_medium": _goal("ours/FP16 bytes, Medium <= 0.51", g("memory.sd35_medium.ratio"), 0.51, le),
        "quantize_vs_copy": _goal("quantize throughput >= 0.5x the memory-copy bound (median of rounds)",
                                  g("quantize.ours_over_copy_bound"), 0.5, ge),
        "report_overhead": _goal("per-layer error for the report <= 10% over quantize-only (median of rounds)",
                                 g("quantize.report_overhead"), 0.10, le),
        "quantize_vs_cast": _goal("quantize throughput >= 1.0x plain cast",
                                  _ratio(g("quantize.ours_mparams_s"), g("quantize.cast_mparams_s")), 1.0, ge),
        "load_peak_rss": _goal("streaming load peak RSS <= 0.6x FP16 file", g("load.peak_rss_over_fp16_file"), 0.6, le),
        "load_fp8_time": _goal("FP8 file load time <= 0.6x FP16 file", g("load.fp8_over_fp16_time"), 0.6, le),
        "load_vs_comfy": _goal("stream quantize + model build <= 1.0x ComfyUI's FP16 load (median of rounds)",
                               g("load.ours_model_over_comfy_time"), 1.0, le),
        "step_time": _goal("FP8 weight-only CPU step <= 1.10x fp32 (median of rounds)",
                           g("step.fp8_weight_only_over_fp32"), 1.10, le),
        "fidelity_vs_cast": _goal("our rel. error <= 0.5x ComfyUI cast",
                                  _ratio(g("fidelity.ours_rel_err"), g("fidelity.comfy_cast_rel_err")), 0.5, le),
        "fidelity_vs_quanto": _goal("our rel. error <= quanto's",
                                    _ratio(g("fidelity.ours_rel_err"), g("fidelity.quanto_rel_err")), 1.0, le),
        "latent_ssim": _goal("latent SSIM after 20 steps >= 0.97", g("fidelity.latent_ssim"), 0.97, ge),
        "budget_vs_presets": _goal("memory budget: planner error / preset error at the same bytes or more <= 1.0",
                                   g("budget.planner_over_preset_max"), 1.0, le),
        "t5xxl_memory": _goal("T5-XXL ours/FP16 bytes <= 0.51", g("t5xxl.ratio"), 0.51, le),
        "t5xxl_fidelity_vs_cast": _goal("T5-XXL rel. error <= 0.5x ComfyUI cast",
                                        _ratio(g("t5xxl.ours_rel_err"), g("t5xxl.comfy_cast_rel_err")), 0.5, le),
        "lora_step": _goal("Medium step with a rank-32 LoRA on every joint block <= 1.10x without (run time, median)",
                           g("lora.lora_over_plain"), 1.10, le),
        "lora_memory": _goal("sampling peak RSS added by the LoRA / (LoRA bytes + one layer in 16-bit) <= 1.0",
                             g("lora.extra_peak_over_allowance"), 1.0, le),
        "budget_greedy": _goal("memory budget: greedy / exact optimum (predicted) <= 1.05",
                               g("budget.greedy_over_optimum_max"), 1.05, le),
    }
