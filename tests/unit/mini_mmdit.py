"""A small torch module with SD3.5 MMDiT layer names (no comfy), for engine tests that need a forward."""

from __future__ import annotations

import torch
from torch import nn

from tools.tiny_sd35 import sincos_pos_embed


class Attn(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q = nn.LayerNorm(dim // 2)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = Attn(dim)
        self.mlp = Mlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


class Joint(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.context_block = Block(dim)
        self.x_block = Block(dim)


class FinalLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)


class MiniMMDiT(nn.Module):
    """Names follow ComfyUI's MMDiT so the SD3.5 presets apply; forward runs every Linear once."""

    def __init__(self, dim: int = 64, depth: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.context_embedder = nn.Linear(dim, dim)
        self.pos_embed = nn.Parameter(sincos_pos_embed((1, 64, dim)))  # SD3's table, as in real checkpoints
        self.joint_blocks = nn.ModuleList(Joint(dim) for _ in range(depth))
        self.final_layer = FinalLayer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.context_embedder(x)
        h = h + self.pos_embed[0, : x.shape[-2]].to(h.dtype)  # cast, as ComfyUI's MMDiT does (FP8 pos_embed)
        for joint in self.joint_blocks:
            for block in (joint.context_block, joint.x_block):
                q, k, v = block.attn.qkv(h).chunk(3, dim=-1)
                attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
                h = h + block.attn.proj(attn)
                h = h + block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(h)))
                h = h * (1 + 0.1 * block.adaLN_modulation(h)[..., : h.shape[-1]].tanh())
        return self.final_layer.linear(h)
