"""Render a results dict as Markdown tables: `python -m bench.table [bench/results/latest.json]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import GIB, RESULTS


def _table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """A title line, a blank line and a Markdown table."""
    return [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _gb(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _f(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def memory(m: dict) -> list[str]:
    rows = [[f"{variant} (depth {r['depth']})", f"{r['params'] / 1e9:.2f} B",
             *(_gb(r["bytes"][k]) for k in ("fp16", "ours", "comfy_cast", "quanto")),
             _f(r["ratio"]), _f(r["ratio_if_pos_embed_16bit"]), f"{r['pos_embed']['share_of_fp16']:.1%}"]
            for variant, r in m.items()]
    checked = all(r.get("check", {}).get("verified", True) for r in m.values())
    pos = [f"{v}: {', '.join(f'{k} {e:.4f}' for k, e in r['pos_embed']['fp8_rel_err'].items())}"
           for v, r in m.items()]
    return _table(f"### 1. Memory (bytes from the architecture; per-tensor rules checked on real depth-2 models: "
                  f"{'agree' if checked else 'DISAGREE'})",
                  ["model", "params", "FP16", "ours (auto preset)", "ComfyUI fp8 cast", "quanto qfloat8", "ours/FP16",
                   "ours/FP16 with pos_embed 16-bit", "pos_embed share"], rows) + [
        "", "pos_embed (sin-cos table) FP8 relative error, scale 1.0 (stored) vs absmax scales: " + "; ".join(pos)]


def _spread(r: dict | None, fmt: str = ".2f") -> str:
    """A per-round ratio as `median (min-max, N rounds)`."""
    if not r:
        return "-"
    return f"{r['median']:{fmt}} ({r['min']:{fmt}}-{r['max']:{fmt}}, {r['rounds']} rounds)"


def quantize(q: dict) -> list[str]:
    names = {"ours": "ours (quantize_weight)", "ours_with_report": "ours + per-layer error for the report",
             "quanto": "optimum-quanto quantize+freeze", "cast": "plain .to(float8_e4m3fn)",
             "copy_bound": "memory-copy bound (2 bytes read, 1 written per parameter)"}
    rows = [[label, _f(q[f"{k}_mparams_s"], ".0f"), _f(q[f"{k}_mparams_s"] / q["cast_mparams_s"], ".2f")]
            for k, label in names.items() if f"{k}_mparams_s" in q]
    spread = q.get("spread", {})
    models = " and of ".join(v.removeprefix("sd35_").capitalize() for v in q.get("per_variant", {}))
    return _table(f"### 2. Quantize throughput ({q['params'] / 1e6:.0f}M params: the Linear layers of block 0 of "
                  f"{models}, float16 in)", ["method", "Mparams/s", "x cast"], rows) + [
        "", f"Per round: ours / copy bound {_spread(spread.get('ours_over_copy_bound'))}; report overhead "
            f"(ours + error / ours - 1) {_spread(spread.get('report_overhead'))}."]


def load(r: dict) -> list[str]:
    size = r["fp16_file_bytes"]
    labels = {"ours_model": "ours: stream quantize + ComfyUI model build", "ours_stream": "ours: stream quantize only",
              "comfy_fp16": "ComfyUI load_diffusion_model (FP16)", "read_fp8": "read our FP8 file",
              "read_fp16": "read the FP16 file"}
    rows = [[label, _f(r["seconds"][k], ".2f"), _gb(r["net_peak_rss"][k]), _f(r["net_peak_rss"][k] / size, ".2f")]
            for k, label in labels.items()]
    spread = r.get("spread", {})
    return _table(f"### 3. Load (Medium depth {r['depth']}, FP16 file {_gb(size)}, FP8 file "
                  f"{_gb(r['fp8_file_bytes'])}; peak RSS net of imports; seconds: each path's median round)",
                  ["path", "seconds", "peak RSS", "x FP16 file"], rows) + [
        "", f"Per round: ours / ComfyUI time {_spread(spread.get('ours_model_over_comfy_time'))}; FP8 / FP16 file "
            f"read time {_spread(spread.get('fp8_over_fp16_time'))}."]


def step(s: dict) -> list[str]:
    header = ["variant", "s / forward (median)", "x fp32 (median of rounds, spread)", "output rel. err"]

    def rows(r: dict) -> list[list]:
        ratio = {name: _spread(v) for name, v in r.get("spread", {}).items()}
        return [[name, _f(sec, ".2f"), ratio.get(name, _f(sec / r["seconds"]["fp32"], ".2f")),
                 _f(r["rel_err"].get(name), ".4f")] for name, sec in r["seconds"].items()]

    lines = _table(f"### 4. CPU step ({s['variant']} depth {s['depth']}, full width, {s['pixels']}px: "
                   f"{s['image_tokens']} image + {s['context_tokens']} text tokens, 2 threads)", header, rows(s))
    if "at_1024px_depth2" in s:
        lines += [""] + _table("At 1024px (depth 2):", header, rows(s["at_1024px_depth2"]))
    return lines


def fidelity(f: dict) -> list[str]:
    by, smp = f["by_weights"], f["sampling"]
    rows = [[name, _f(by["student_t"][name], ".4f"), _f(by["gaussian"][name], ".4f")] for name in by["student_t"]]
    srows = [[name, _f(v["latent_ssim"], ".4f"), _f(v["latent_psnr_db"], ".2f"), _f(v["latent_rel_err"], ".4f")]
             for name, v in smp.items() if isinstance(v, dict)]
    return (_table(f"### 5. Fidelity vs fp32 (Medium depth {f['depth']}, full width, {f['pixels']}px, 4 timesteps)",
                   ["method", "rel. err (student_t)", "rel. err (gaussian)"], rows)
            + [""] + _table(f"{smp['steps']}-step Euler sampling (depth {smp['depth']}, {smp['pixels']}px, "
                            f"shift {smp['shift']}, no CFG), vs fp32; no real VAE here, so PSNR is on the latent:",
                            ["method", "latent SSIM", "latent PSNR (dB)", "latent rel. err"], srows))


def sensitivity(s: dict) -> list[str]:
    lines = []
    for variant in (v for v in ("sd35_medium", "sd35_large") if v in s):
        r = s[variant]
        kinds = [k for k in ("student_t", "gaussian") if k in r]
        header = ["group in FP8 (only it, or the preset's with one group 16-bit)", "layers", "share of the model",
                  *(h for k in kinds for h in (f"rel. err ({k})", f"err per % saved ({k})"))]
        rows = [[group, "-" if row["layers"] is None else row["layers"], _f(row["share_of_model"], ".2%"),
                 *(_f(r[k][group].get(e), ".4f") for k in kinds for e in ("rel_err", "err_per_pct_saved"))]
                for group, row in r[kinds[0]].items()]
        lines += _table(f"### 6. Sensitivity, {variant} (depth {s['depth']}, full width, {s['pixels']}px; pos_embed: "
                        "the stored FP8 table; x_embedder: a Conv2d, emulated)", header, rows)
        lines += ["", "Memory-budget factors (output err^2 per layer err^2; quant/sensitivity.json): " +
                  ", ".join(f"{g} {f:.3g}" for g, f in r["factors"].items()), ""]
    return lines


STOCK_PATH_LABELS = {
    "stock_full_precision": "stock 0.8.0, layers marked full_precision_matrix_mult (what we write)",
    "stock_no_input_scale": "stock 0.8.0 FP8 x FP8, no input_scale (activation scale 1.0)",
    "stock_calibrated": "stock 0.8.0 FP8 x FP8, input_scale calibrated on 4 other sampling steps",
    "ours_weight_only": "ours, weight_only (per-channel)",
    "ours_fp8_matmul": "ours, fp8_matmul (per-token x per-channel)",
}


def stock_path(r: dict) -> list[str]:
    models = [(k, r[k]) for k in ("tiny", "sd35_medium") if k in r]
    heads = [f"tiny (Large shapes, depth 2), {m['pixels']}px" if k == "tiny" else
             f"Medium full width, depth {m['depth']}, {m['pixels']}px" for k, m in models]
    rows = [[label] + [f"{m[key]['rel_err']:.4f} ({m[key]['scaled_mm_calls']} FP8 matmuls)" for _, m in models]
            for key, label in STOCK_PATH_LABELS.items()]
    return _table(f"### 7. Files for stock ComfyUI: output error vs the 16-bit model ({r['host']}, per-tensor e4m3 "
                  f"file; {r['weights']} weights)", ["path", *heads], rows)


def budget(b: dict) -> list[str]:
    lines = []
    for variant in ("sd35_medium", "sd35_large"):
        r = b[variant]
        full = r["sixteen_bit_bytes"]
        rows = [[f"planner at {p['budget'] / full:.3f}", _f(p["bytes"] / full), _f(p["predicted"], ".4f"),
                 _f(p["measured"], ".4f"), "-", "-"] for p in r["planner"]]
        rows += [[name, _f(p["bytes"] / full), "-", _f(p["measured"], ".4f"), _f(p["planner_measured"], ".4f"),
                  _f(p.get("planner_worst_at_or_above"), ".4f")] for name, p in r["presets"].items()]
        lines += _table(f"### 8. Memory budget, {variant} (depth {r['depth']}, full width, {r['pixels']}px; bytes / "
                        "16-bit bytes)", ["budget or preset", "bytes", "predicted err", "measured err",
                                          "planner at the preset's bytes",
                                          "planner, worst at those bytes or more"], rows) + [""]
    rows = [[v, f"{row['budget_gib']:.2f}", _f(row["greedy"], ".4f"), _f(row["optimum"], ".4f"),
             _f(row["ratio"], ".4f")] for v, rows_ in b["greedy_vs_optimum"].items() for row in rows_]
    return lines + _table("Greedy vs exact optimum (full-size layer lists, predicted error)",
                          ["model", "budget GiB", "greedy", "optimum", "greedy / optimum"], rows) + \
        ["", f"![memory budget]({b['plot']})"]


def t5xxl(t: dict) -> list[str]:
    b, by = t["bytes"], t["by_weights"]
    labels = {"ours": "ours (FP8 projections, per-channel; embeddings, norms, bias table 16-bit)",
              "ours_fp8_embedding": "ours + token table FP8 (scale 1.0)",
              "comfy_cast": "ComfyUI fp8_e4m3fn cast (every tensor)"}
    rows = [["FP16", _gb(b["fp16"]), "1.000", "-", "-"]]
    rows += [[label, _gb(b[k]), _f(b[k] / b["fp16"]), *(_f(by[w][k], ".4f") for w in ("student_t", "gaussian"))]
             for k, label in labels.items()]
    return _table(f"### 9. T5-XXL ({t['params'] / 1e9:.2f} B params; bytes at full size; output error vs float16 "
                  f"weights in float32 at depth {t['depth']}, full width, {t['prompts']} tokenized prompts)",
                  ["method", "bytes", "x FP16", "rel. err (student_t)", "rel. err (gaussian)"], rows)


def lora(r: dict) -> list[str]:
    rows = [[f"{r['variant']} (depth {r['depth']}, {r['pixels']} px)", f"{r['patched_keys']} of {r['fp8_linears']} FP8",
             f"{r['seconds']['plain']:.2f}", f"{r['seconds']['lora']:.2f}", _spread(r["spread"], ".3f"),
             _gb(r["peak_rss_plain"]), _gb(r["peak_rss_lora"]),
             f"{r['peak_rss_added'] / 2**20:.0f} MiB",
             f"{(r['lora_bytes'] + r['largest_layer_16bit_bytes']) / 2**20:.0f} MiB"]]
    return _table(f"### 11. LoRA at run time (rank {r['rank']} on every joint block; one denoiser call, ComfyUI "
                  "0.3.75 --cpu, weight_only)",
                  ["model", "patched layers", "s without", "s with", "with / without", "peak RSS without",
                   "peak RSS with", "added", "allowance (LoRA + one 16-bit layer)"], rows)


def soak_table(s: dict) -> list[str]:
    rows = [[s["n_prompts"], s["warmup"], _f(s["rss_growth_ratio"], ".4f"), s["tensor_growth"],
             _f(s["tensor_mb_growth"], ".2f"), _f(s["seconds_per_prompt_median"], ".2f"), s["failed"],
             "yes" if s["server_alive_at_end"] else "NO"]]
    return _table("### Soak (quantize + sample prompts in one ComfyUI server; growth after the warm-up prompts)",
                  ["prompts", "warm-up", "RSS growth ratio", "live tensors added", "tensor MB added", "s / prompt",
                   "failed", "server alive"], rows)


def goals(g: dict) -> list[str]:
    verdict = {None: "-", True: "pass", False: "FAIL"}
    rows = [[v["goal"], _f(v["value"], ".3f"), v["target"], verdict[v["pass"]]] for v in g.values()]
    return _table("### Goals", ["goal", "measured", "target", ""], rows)


RENDER = {"memory": memory, "quantize": quantize, "load": load, "step": step, "fidelity": fidelity,
          "sensitivity": sensitivity, "stock_path": stock_path, "budget": budget, "t5xxl": t5xxl,
          "lora": lora, "soak": soak_table}


def render(results: dict, only: list[str] | None = None) -> str:
    """The whole results as Markdown, or (`only`) just those sections' tables."""
    lines = []
    if only is None:
        m = results.get("machine", {})
        lines += [f"## Benchmark ({results.get('mode')} run, {results.get('date')})", "",
                  f"Machine: {m.get('cpu')}, {m.get('cores')} cores ({m.get('threads_used')} threads used), "
                  f"{m.get('ram_gib')} GiB RAM; torch {results.get('torch')}. Random weights (see bench/README.md).",
                  ""]
    for name, fn in RENDER.items():
        section = results.get(name)
        if only is not None and name not in only:
            continue
        if isinstance(section, dict) and "error" in section:
            lines += [f"### {'Soak' if name == 'soak' else name}: failed: {section['error'].splitlines()[-1]}", ""]
        elif isinstance(section, dict):
            lines += fn(section) + [""]
    return "\n".join(lines + (goals(results.get("goals", {})) if only is None else []))


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "latest.json"
    print(render(json.loads(path.read_text())))
