"""Section 6, per-module sensitivity: the output error when only one module group is FP8 (e4m3, per-channel).

This is the data the presets are chosen from: a group belongs in the 16-bit protected set when its error
is large for the memory it would save. For each group: relative output error vs fp32 (reduced depth, full
width, 4 samples at timesteps 900..100), its share of the full-size model's 16-bit bytes, and error per
percent of the model saved (`err_per_pct_saved`). `pos_embed` and the x_embedder Conv2d are not Linear
layers: pos_embed is replaced by the FP8 table (scale 1.0) the default preset stores; the Conv2d's FP8 error
is emulated by replacing its weight with its per-channel FP8 round trip.
"""

from __future__ import annotations

import fnmatch

import torch

from quant.formats import dequantize_weight, quantize_weight
from quant.policy import ProtectionPolicy

from . import models
from .common import log, rel_err

GROUPS: dict[str, tuple[str, ...]] = {
    "embedders": ("t_embedder.*", "y_embedder.*", "context_embedder"),
    "final_layer": ("final_layer.*",),
    "adaLN_modulation": ("joint_blocks.*.adaLN_modulation.1",),
    "qkv": ("joint_blocks.*.attn.qkv", "joint_blocks.*.attn2.qkv"),
    "proj": ("joint_blocks.*.attn.proj", "joint_blocks.*.attn2.proj"),
    "mlp": ("joint_blocks.*.mlp.fc1", "joint_blocks.*.mlp.fc2"),
    "first_block": ("joint_blocks.0.*",),
    "middle_block": ("joint_blocks.{mid}.*",),
    "last_block": ("joint_blocks.{last}.*",),
}
EMULATED = {"pos_embed": "pos_embed", "x_embedder": "x_embedder.proj.weight"}


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


def _one_kind(kind: str, depth: int, pixels: int, full_shapes: dict, full_depth: int) -> dict:
    log(f"sensitivity: {kind} weights, depth {depth}, {pixels}px")
    ref = models.reference("sd35_medium", depth, kind)
    inp = models.inputs(pixels, seed=3, batch=4)
    reference = models.forward(ref, inp)
    names = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]
    full_names = [k[: -len(".weight")] for k, s in full_shapes.items() if k.endswith(".weight") and len(s) == 2]
    rows = {}
    for group, globs in GROUPS.items():
        chosen = set(_members(names, globs, depth))
        policy = ProtectionPolicy(f"only {group}", frozenset(set(names) - chosen))
        out = models.forward(models.ours(ref, policy=policy), inp)
        full_members = _members(full_names, globs, full_depth)
        rows[group] = {"layers": len(chosen), "rel_err": rel_err(reference, out),
                       "share_of_model": _share(full_shapes, [f"{n}.weight" for n in full_members])}
    for group, key in EMULATED.items():
        copy = models.sharing_copy(ref)
        owner, _, attr = key.rpartition(".")
        target = copy.get_submodule(owner)  # "" is the model itself
        value = _roundtrip(getattr(target, attr).detach())
        if isinstance(getattr(target, attr), torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
        setattr(target, attr, value)
        rows[group] = {"layers": 1, "rel_err": rel_err(reference, models.forward(copy, inp)),
                       "share_of_model": _share(full_shapes, [key]), "emulated": group != "pos_embed"}
    rows["default_preset (all but protected)"] = {
        "layers": None, "rel_err": rel_err(reference, models.forward(models.ours(ref), inp)), "share_of_model": None}
    for row in rows.values():
        if row["share_of_model"]:
            row["err_per_pct_saved"] = row["rel_err"] / (50 * row["share_of_model"])
    return rows


def run(quick: bool) -> dict:
    depth, pixels = (3, 256) if quick else (6, 512)
    full_shapes = {k: tuple(v.shape) for k, v in models.meta_model("sd35_medium").state_dict().items()}
    full_depth = models.depth_of("sd35_medium")
    out = {"variant": "sd35_medium", "depth": depth, "pixels": pixels, "share_basis": "full-size Medium, 16-bit bytes"}
    return out | {kind: _one_kind(kind, depth, pixels, full_shapes, full_depth)
                  for kind in (("student_t",) if quick else ("student_t", "gaussian"))}
