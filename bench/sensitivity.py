"""Section 6, per-module sensitivity, Medium and Large: the output error when only one module group is FP8 (e4m3,
per-channel), and when the preset's model keeps one more group 16-bit.

This is the data the presets are chosen from (a group belongs in the 16-bit protected set when its error
is large for the memory it would save) and the memory budget's per-group factors (`factors`, written
to quant/sensitivity.json by `python -m bench.sensitivity`). For each group: relative output error
vs fp32 (reduced depth, full width, 4 samples at timesteps 900..100), its share of the full-size model's
16-bit bytes, and error per percent of the model saved (`err_per_pct_saved`). `pos_embed` and the x_embedder
Conv2d are not Linear layers: pos_embed is replaced by the FP8 table (scale 1.0) the default preset stores; the
Conv2d's FP8 error is emulated by replacing its weight with its per-channel FP8 round trip.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch

from sd35_fp8.quant.config import QuantConfig
from sd35_fp8.quant.decision import STORED_FP8
from sd35_fp8.quant.formats import dequantize_weight, quantize_weight, relative_error
from sd35_fp8.quant.policy import ProtectionPolicy
from sd35_fp8.quant.quantize import quantize

from . import models
from .common import REPO, RESULTS, log, rel_err

GROUPS: dict[str, tuple[str, ...]] = {
    "embedders": ("t_embedder.*", "y_embedder.*", "context_embedder"),
    "final_layer": ("final_layer.*",),
    "x_adaLN": ("joint_blocks.*.x_block.adaLN_modulation.1",),
    "context_adaLN": ("joint_blocks.*.context_block.adaLN_modulation.1",),
    "x_qkv": ("joint_blocks.*.x_block.attn.qkv", "joint_blocks.*.x_block.attn2.qkv"),
    "context_qkv": ("joint_blocks.*.context_block.attn.qkv",),
    "x_proj": ("joint_blocks.*.x_block.attn.proj", "joint_blocks.*.x_block.attn2.proj"),
    "context_proj": ("joint_blocks.*.context_block.attn.proj",),
    "x_mlp": ("joint_blocks.*.x_block.mlp.fc1", "joint_blocks.*.x_block.mlp.fc2"),
    "context_mlp": ("joint_blocks.*.context_block.mlp.fc1", "joint_blocks.*.context_block.mlp.fc2"),
    "first_block": ("joint_blocks.0.*",),
    "middle_block": ("joint_blocks.{mid}.*",),
    "last_block": ("joint_blocks.{last}.*",),
}
EMULATED = {"pos_embed": "pos_embed", "x_embedder": "x_embedder.proj.weight"}
# the groups the SD3.5 presets leave in FP8, per stream: x_ the image tokens' (x_block), context_ the text
# tokens' (context_block); the text side reaches the image only through attention and matters far less
MARGINAL = ("x_adaLN", "context_adaLN", "x_qkv", "context_qkv", "x_proj", "context_proj", "x_mlp", "context_mlp")
FACTOR_GROUPS = ("embedders", "final_layer", *MARGINAL, "pos_embed")  # the memory budget's groups
VARIANTS = {"sd35_medium": ("student_t", "gaussian"), "sd35_large": ("student_t",)}  # weight kinds measured
FACTORS_FILE = REPO / "quant" / "sensitivity.json"


def _members(names: list[str], globs: tuple[str, ...], depth: int) -> list[str]:
    """Layer names matching the group's globs in a model of `depth` blocks."""
    filled = [g.format(mid=depth // 2, last=depth - 1) for g in globs]
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in filled)]


def _roundtrip(t: torch.Tensor) -> torch.Tensor:
    """pos_embed: the FP8 table with scale 1.0 the model really runs on (ComfyUI's MMDiT casts it in forward);
    other non-Linear tensors (the x_embedder Conv2d): a per-output-channel e4m3 round trip."""
    if t.dim() == 3:  # pos_embed [1, patches, hidden]
        return t.to(torch.float8_e4m3fn)
    return dequantize_weight(*quantize_weight(t.reshape(t.shape[0], -1))).reshape(t.shape)


def _share(full_shapes: dict[str, tuple[int, ...]], keys: list[str]) -> float:
    total = sum(torch.Size(s).numel() for s in full_shapes.values())
    return sum(torch.Size(full_shapes[k]).numel() for k in keys) / total


def _sq_sum(report, names: set[str]) -> float:
    """Sum of the squared weight errors of the named layers' FP8 rows."""
    return sum(row.rel_error**2 for row in report.layers if row.name in names and row.action in STORED_FP8)


def _one_kind(variant: str, kind: str, depth: int, pixels: int) -> dict:
    log(f"sensitivity: {variant}, {kind} weights, depth {depth}, {pixels}px")
    full_shapes = {k: tuple(v.shape) for k, v in models.meta_model(variant).state_dict().items()}
    ref = models.reference(variant, depth, kind)
    inp = models.inputs(pixels, seed=3, batch=4)
    reference = models.forward(ref, inp)
    names = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]
    full_names = [k[: -len(".weight")] for k, s in full_shapes.items() if k.endswith(".weight") and len(s) == 2]

    def run(policy=None, patterns: str = "") -> tuple[float, object]:
        config = QuantConfig(compute="weight_only", protect_patterns=patterns)
        model, report = quantize(models.sharing_copy(ref), config, policy=policy, inplace=True)
        return rel_err(reference, models.forward(model.eval(), inp)), report

    rows = {}
    for group, globs in GROUPS.items():
        chosen = set(_members(names, globs, depth))
        err, report = run(ProtectionPolicy(f"only {group}", frozenset(set(names) - chosen)))
        full_members = _members(full_names, globs, models.depth_of(variant))
        rows[group] = {"layers": len(chosen), "rel_err": err, "weight_err_sq_sum": _sq_sum(report, chosen),
                       "share_of_model": _share(full_shapes, [f"{n}.weight" for n in full_members])}
    for group, key in EMULATED.items():
        copy = models.sharing_copy(ref)
        owner, _, attr = key.rpartition(".")
        target = copy.get_submodule(owner)  # "" is the model itself
        original = getattr(target, attr).detach()
        value = _roundtrip(original)
        rows[group] = {"layers": 1, "weight_err_sq_sum": relative_error(original, value.float()) ** 2}
        if isinstance(getattr(target, attr), torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
        setattr(target, attr, value)
        rows[group] |= {"rel_err": rel_err(reference, models.forward(copy, inp)),
                        "share_of_model": _share(full_shapes, [key]), "emulated": group != "pos_embed"}
    preset_err, preset_report = run()
    rows["default_preset (all but protected)"] = {"layers": None, "rel_err": preset_err, "share_of_model": None}
    for group in MARGINAL:  # from the preset, the group 16-bit: the step the memory budget's planner takes
        chosen = set(_members(names, GROUPS[group], depth))
        err, _ = run(patterns="\n".join(GROUPS[group]))
        rows[f"preset + {group} 16-bit"] = {"layers": len(chosen), "rel_err": err, "share_of_model": None,
                                            "preset_err": preset_err,
                                            "weight_err_sq_sum": _sq_sum(preset_report, chosen)}
    for row in rows.values():
        if row["share_of_model"]:
            row["err_per_pct_saved"] = row["rel_err"] / (50 * row["share_of_model"])
    return rows


def factors(rows: dict) -> dict[str, float]:
    """The memory budget's factor per group: output error^2 per unit of summed layer error^2. For the groups the
    preset leaves in FP8, the error^2 the group removes when kept 16-bit on top of the preset (the regime the
    planner decides in); for the others (embedders, final layer, pos_embed), and for a step group whose gain is not
    positive (below what the measurement resolves), the group's error^2 when only it is FP8."""
    out = {}
    for group in FACTOR_GROUPS:
        step = rows.get(f"preset + {group} 16-bit")
        gain = step["preset_err"] ** 2 - step["rel_err"] ** 2 if step else 0.0
        if gain > 0:
            out[group] = gain / step["weight_err_sq_sum"]
        else:  # not a step group, or its step is lost in the noise: the group alone in FP8
            out[group] = rows[group]["rel_err"] ** 2 / rows[group]["weight_err_sq_sum"]
    return out


def run(quick: bool) -> dict:
    depth, pixels = (2, 128) if quick else (4, 384)
    out = {"depth": depth, "pixels": pixels, "share_basis": "the full-size variant's 16-bit bytes"}
    for variant, kinds in list(VARIANTS.items())[:1 if quick else None]:  # quick: Medium only
        out[variant] = {kind: _one_kind(variant, kind, depth, pixels) for kind in (kinds[:1] if quick else kinds)}
        out[variant]["factors"] = factors(out[variant]["student_t"])
    return out


def write_factors(results: Path = RESULTS / "latest.json") -> Path:
    """quant/sensitivity.json from the sensitivity section of `results` (what the memory budget's
    planner reads)."""
    data = json.loads(results.read_text())
    s = data["sensitivity"]
    if missing := [v for v in VARIANTS if v not in s]:  # a quick run measures Medium only
        raise SystemExit(f"{results}: section 6 has no {', '.join(missing)} ({data['mode']} run); the factors come "
                         "from a full run: python -m bench.run --only sensitivity --update")
    when = data.get("updated", {}).get("sensitivity", f"{data['date']} on {data['machine']['cpu']}")
    table = {"source": f"python -m bench.run, section 6 (bench/sensitivity.py), {data['mode']} run of {when}: "
                       f"depth {s['depth']}, full width, {s['pixels']}px, student_t weights, e4m3 per-channel. "
                       "Refresh: python -m bench.run --only sensitivity --update, then python -m bench.sensitivity",
             "model": "output_err^2 ~ sum over FP8 layers of factor(variant, group) * layer_weight_err^2 "
                      "(bench/sensitivity.py factors())",
             "globs": {g: list(GROUPS.get(g) or [EMULATED[g]]) for g in FACTOR_GROUPS},
             "factors": {v: s[v]["factors"] for v in VARIANTS}}
    FACTORS_FILE.write_text(json.dumps(table, indent=1) + "\n")
    return FACTORS_FILE


if __name__ == "__main__":
    print(f"wrote {write_factors()}")
