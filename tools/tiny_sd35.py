"""Build tiny SD3.5-architecture checkpoints for tests, the demo and benchmarks.

No weights can be downloaded, so we make them: ComfyUI's own model classes are
instantiated on the meta device only to enumerate the exact key names and shapes,
then every tensor is drawn here, seeded per key, so the files are deterministic and
every value is set (ComfyUI builds models with uninitialised memory).

Outputs (in --out):
  tiny_sd35_large.safetensors        all-in-one: MMDiT (qk RMS norm) + SD3 VAE + CLIP-L
  tiny_sd35_medium.safetensors       all-in-one: MMDiT-X (x_block attn2 layers) + VAE + CLIP-L
  tiny_sd35_large_turbo.safetensors  all-in-one, Large shapes, "turbo" in name and metadata
  tiny_sd35_large_t5xxl.safetensors  the Large all-in-one + a T5-XXL (text_encoders.t5xxl.transformer.*)
  tiny_t5xxl.safetensors             the same T5-XXL alone, as in text_encoders/ (for the CLIP loaders)
  tiny_sd35_large_transformer.safetensors / tiny_sd35_medium_transformer.safetensors
                                     diffusion model only (no prefix), as in diffusion_models/
  tiny_sd35_medium_diffusers/        diffusers-format folder (transformer/ sharded), made with
                                     diffusers' own SD3Transformer2DModel
  manifest.json                      what was built, with the configs

Run inside a Python that can import ComfyUI (pass its folder with --comfy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
BUILDER_VERSION = "2"  # 2: pos_embed is the sin-cos table, as in the real checkpoints
HEAD_DIM = 64  # ComfyUI derives depth (= heads) as hidden // 64

# Tiny variants. hidden = 64 * depth, as ComfyUI's detection assumes.
VARIANTS: dict[str, dict] = {
    "large": {"depth": 2, "pos_embed_max_size": 16, "x_block_self_attn_layers": []},
    "medium": {"depth": 3, "pos_embed_max_size": 24, "x_block_self_attn_layers": [0, 1]},
}
# The real architectures (public configs), built on the meta device for shape-only tests and the benchmark.
FULL_SIZE: dict[str, dict] = {
    "sd35_large": {"depth": 38, "pos_embed_max_size": 192, "x_block_self_attn_layers": []},
    "sd35_medium": {"depth": 24, "pos_embed_max_size": 384, "x_block_self_attn_layers": list(range(13))},
}
CONTEXT_DIM = 4096  # T5-XXL width; CLIP-L/G contexts are zero-padded to it
ADM_DIM = 2048  # pooled CLIP-L (768) + CLIP-G (1280)
# T5-XXL as ComfyUI builds it (comfy/text_encoders/t5_config_xxl.json) with fewer, narrower heads and a narrower
# feed-forward: the width (SD3's context), vocabulary, 24 blocks (ComfyUI's CLIP loaders detect T5-XXL by
# block 23's wi_1), gated GELU and relative attention bias are the real ones. ComfyUI reads this override from
# model_options["t5xxl_model_config"]; `use_tiny_t5xxl` puts it there for the tests.
TINY_T5XXL = {"num_heads": 2, "d_kv": 16, "d_ff": 32}
VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def mmdit_kwargs(variant: str, depth: int | None = None) -> dict:
    """ComfyUI MMDiT constructor arguments for a tiny (VARIANTS) or full-size (FULL_SIZE) variant.
    `depth` overrides the number of blocks and keeps the width (reduced-depth benchmarks)."""
    v = VARIANTS.get(variant) or FULL_SIZE[variant]
    hidden = HEAD_DIM * v["depth"]
    blocks = depth or v["depth"]
    return {
        "patch_size": 2, "in_channels": 16, "out_channels": 16, "depth": v["depth"], "num_blocks": blocks,
        "input_size": None, "adm_in_channels": ADM_DIM,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": CONTEXT_DIM, "out_features": hidden}},
        "num_patches": v["pos_embed_max_size"] ** 2, "pos_embed_max_size": v["pos_embed_max_size"],
        "qk_norm": "rms", "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [i for i in v["x_block_self_attn_layers"] if i < blocks],
    }


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in module.state_dict().items()}


def build_mmdit(variant: str, device: str = "meta", dtype: torch.dtype = torch.float16, depth: int | None = None):
    """ComfyUI's own MMDiT class (needs the booted or importable host) with uninitialised weights."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    return MMDiT(**mmdit_kwargs(variant, depth), device=device, dtype=dtype, operations=comfy.ops.disable_weight_init)


def vae_shapes() -> dict[str, tuple[int, ...]]:
    import comfy.ops  # noqa: F401  (model.py expects comfy.ops to be importable)
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    with torch.device("meta"):
        parts = {"encoder": Encoder(**VAE_DDCONFIG), "decoder": Decoder(**VAE_DDCONFIG)}
    return {f"{name}.{k}": s for name, part in parts.items() for k, s in _meta_shapes(part).items()}


def clip_l_shapes() -> dict[str, tuple[int, ...]]:
    import comfy.sd1_clip

    model = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    return {k: s for k, s in _meta_shapes(model).items() if k.startswith("transformer.")}


def t5xxl_config(override: dict | None = None) -> dict:
    """ComfyUI's own T5-XXL config (full size), with `override` applied (TINY_T5XXL for the fixture)."""
    import comfy.text_encoders.t5

    path = Path(comfy.text_encoders.t5.__file__).with_name("t5_config_xxl.json")
    return json.loads(path.read_text()) | (override or {})


def build_t5xxl(override: dict | None = None, device: str = "meta", dtype: torch.dtype = torch.float16):
    """ComfyUI's own T5 encoder class (uninitialised weights), full size or with `override`."""
    import comfy.ops
    import comfy.text_encoders.t5

    return comfy.text_encoders.t5.T5(t5xxl_config(override), dtype, device, comfy.ops.disable_weight_init)


def use_tiny_t5xxl() -> None:
    """Test-only: this process's ComfyUI builds every T5-XXL with TINY_T5XXL (it reads a fixed config otherwise),
    as the fixture's T5 needs. Call it after booting the host."""
    import comfy.text_encoders.sd3_clip as sd3_clip

    model = sd3_clip.T5XXLModel
    if getattr(model, "tiny_config", None) is not None:
        return
    init = model.__init__

    def tiny_init(self, *args, model_options: dict | None = None, **kwargs) -> None:
        init(self, *args, model_options={"t5xxl_model_config": dict(TINY_T5XXL), **(model_options or {})}, **kwargs)

    model.__init__, model.tiny_config = tiny_init, TINY_T5XXL


def sincos_pos_embed(shape: tuple[int, ...]) -> torch.Tensor:
    """SD3's fixed 2-D sin-cos position table, [1, side*side, hidden] float32, values in [-1, 1]: what the
    official checkpoints ship as `pos_embed` (ComfyUI's mmdit.py notes its own table matches it)."""
    _, patches, hidden = shape
    side = math.isqrt(patches)
    quarter = hidden // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    angles = torch.arange(side, dtype=torch.float64)[:, None] * omega[None, :]
    axis = torch.cat([angles.sin(), angles.cos()], dim=1).float()  # [side, hidden / 2]
    table = torch.empty(side, side, hidden)
    table[:, :, : hidden // 2] = axis[None, :, :]  # the first half encodes the column (w) ...
    table[:, :, hidden // 2:] = axis[:, None, :]  # ... the second the row (h)
    return table.reshape(1, patches, hidden)


def draw_tensor(key: str, shape: tuple[int, ...], seed: int, gain: float = 1.0) -> torch.Tensor:
    """One tensor, deterministic for (seed, key): norms 1, biases 0, the rest small random."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape)
    if len(shape) == 1 and leaf == "weight":
        return torch.ones(shape)  # every 1-D weight in these models is a norm scale
    if leaf == "logit_scale" or len(shape) == 0:
        return torch.full(shape, 4.6052)
    if key.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    if key.endswith("pos_embed") and len(shape) == 3:
        return sincos_pos_embed(shape)
    key_seed = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(key_seed))
    if "embedding" in key:
        return values * 0.02
    return values * (gain / max(math.prod(shape[1:]), 1) ** 0.5)  # scaled by the fan-in


def draw_state_dict(shapes: dict[str, tuple[int, ...]], seed: int, prefix: str = "",
                    gain: float = 1.0) -> dict[str, torch.Tensor]:
    out = {}
    for key, shape in shapes.items():
        t = draw_tensor(key, shape, seed, gain)
        out[prefix + key] = t if key.endswith("position_ids") else t.half()
    return out


def t5xxl_init_scale_(tensors: dict[str, torch.Tensor], d_kv: int) -> None:
    """In place, on tensors drawn with std 1/sqrt(fan-in): T5's own initialisation scale (Mesh TensorFlow,
    transformers' T5 `_init_weights`), the query also 1/sqrt(d_kv) (T5's attention has no 1/sqrt(d) of its own:
    drawn like the rest, its logits would be 8x too wide and the softmax one-hot) and the token table std 1."""
    with torch.no_grad():
        for key, tensor in tensors.items():
            if key.endswith("SelfAttention.q.weight"):
                tensor.div_(d_kv**0.5)
            elif key == "shared.weight":
                tensor.mul_(tensor.shape[1] ** 0.5)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def build_diffusers_folder(out: Path, variant: str, seed: int) -> None:
    """A diffusers-format SD3.5 folder made by diffusers' own class (sharded weights)."""
    from diffusers import SD3Transformer2DModel

    v = VARIANTS[variant]
    depth = v["depth"]
    config = {
        "sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": depth,
        "attention_head_dim": HEAD_DIM, "num_attention_heads": depth, "joint_attention_dim": CONTEXT_DIM,
        "caption_projection_dim": HEAD_DIM * depth, "pooled_projection_dim": ADM_DIM, "out_channels": 16,
        "pos_embed_max_size": v["pos_embed_max_size"], "qk_norm": "rms_norm",
        "dual_attention_layers": tuple(v["x_block_self_attn_layers"]),
    }
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**config)
    with torch.no_grad():
        for key, param in model.state_dict().items():
            param.copy_(draw_tensor(key, tuple(param.shape), seed, gain=0.5))
    model = model.to(torch.float16)
    tmp = out.with_name(f".{out.name}.tmp")
    model.save_pretrained(tmp / "transformer", max_shard_size="2MB", safe_serialization=True)
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
    }, indent=2))
    tmp.replace(out)


def build_all(out: Path, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    stamp = hashlib.sha256((Path(__file__).read_text() + str(seed)).encode()).hexdigest()[:16]  # changes with this code
    if manifest_path.exists() and (manifest := json.loads(manifest_path.read_text())).get("stamp") == stamp:
        return manifest
    vae = draw_state_dict(vae_shapes(), seed, prefix="first_stage_model.")
    clip_l = draw_state_dict(clip_l_shapes(), seed, prefix="text_encoders.clip_l.")
    t5xxl = draw_state_dict(_meta_shapes(build_t5xxl(TINY_T5XXL)), seed)
    t5xxl_init_scale_(t5xxl, TINY_T5XXL["d_kv"])
    manifest: dict = {"stamp": stamp, "builder_version": BUILDER_VERSION, "seed": seed, "files": {}}
    for variant in VARIANTS:
        dm = draw_state_dict(_meta_shapes(build_mmdit(variant)), seed, gain=0.5)
        full = {f"model.diffusion_model.{k}": v for k, v in dm.items()} | vae | clip_l
        for name in [variant] + (["large_turbo", "large_t5xxl"] if variant == "large" else []):
            meta = {"modelspec.title": f"tiny SD3.5 {name.replace('_', ' ')} (random weights, test fixture)"}
            path = out / f"tiny_sd35_{name}.safetensors"
            t5_part = {f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5xxl.items()} if "t5" in name else {}
            _atomic_save(full | t5_part, path, meta)
            manifest["files"][name] = {"all_in_one": path.name, "mmdit": mmdit_kwargs(variant)}
        dm_path = out / f"tiny_sd35_{variant}_transformer.safetensors"
        _atomic_save(dm, dm_path, {"modelspec.title": f"tiny SD3.5 {variant} transformer"})
        manifest["files"][variant]["transformer"] = dm_path.name
    _atomic_save(t5xxl, out / "tiny_t5xxl.safetensors", {"modelspec.title": "tiny T5-XXL (random weights)"})
    manifest["files"]["t5xxl"] = {"text_encoder": "tiny_t5xxl.safetensors", "t5xxl_model_config": TINY_T5XXL}
    diffusers_dir = out / "tiny_sd35_medium_diffusers"
    if not diffusers_dir.exists():
        build_diffusers_folder(diffusers_dir, "medium", seed)
    manifest["files"]["medium"]["diffusers"] = diffusers_dir.name
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def build_in_subprocess(comfy_dir: str | Path, out: Path) -> dict:
    """`build_all` (or reuse) in a child process, as booting ComfyUI fixes the booting process's settings, on the
    plain host (no FP8-device mode: the fixtures are data, the same for every host). Returns the manifest."""
    subprocess.run([sys.executable, "-m", "tools.tiny_sd35", "--comfy", str(comfy_dir), "--out", str(out)],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "COMFY_FP8_DEVICE": ""})
    return json.loads((out / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy", required=True, help="ComfyUI folder (for its model classes)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from tools.comfy_host import boot

    boot(args.comfy)
    manifest = build_all(Path(args.out), args.seed)
    print(json.dumps(manifest["files"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
