"""Random weights with realistic statistics (no real SD3.5 weights can be downloaded here).

Two kinds, both deterministic per (seed, key) and rounded to float16 like a real checkpoint:
- `gaussian`: N(0, 1/fan_in), the textbook initialisation;
- `student_t`: heavy tails (Student-t, 4 degrees of freedom, same variance), a few outlier input
  channels (1% of columns x8) and uneven output channels (row gains log-normal, sigma 0.3): what
  trained transformer weights look like, and what a bare cast or a per-tensor scale handles worst.
Norm scales are 1 + N(0, 0.05), biases N(0, 0.01), `pos_embed` the 2-D sin-cos table SD3 ships.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

from tools import tiny_sd35

KINDS = ("gaussian", "student_t")
T_DOF = 4
OUTLIER_CHANNELS = 0.01
OUTLIER_GAIN = 8.0
ROW_GAIN_SIGMA = 0.3


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def student_t(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Unit-variance Student-t(4): z / sqrt(chi2_4 / 4), with chi2_4 = -2 log(U1 U2) for uniforms U in (0, 1]."""
    z = torch.randn(shape, generator=gen)
    u = torch.rand(shape, generator=gen).neg_().add_(1.0)
    chi2 = u.mul_(torch.rand(shape, generator=gen).neg_().add_(1.0)).log_().mul_(-2.0 / T_DOF)
    return z.div_(chi2.sqrt_()).mul_(math.sqrt((T_DOF - 2) / T_DOF))


def matrix(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    """A weight of `shape` ([out, in, ...]) with std 1/sqrt(fan_in) and the statistics of `kind`."""
    std = 1.0 / math.sqrt(math.prod(shape[1:]) or 1)  # 1 / sqrt(fan_in)
    if kind == "gaussian":
        return torch.randn(shape, generator=gen).mul_(std)
    if kind != "student_t":
        raise ValueError(f"weight kind {kind!r} is not one of {KINDS}")
    w = student_t(shape, gen).mul_(std)
    flat = w.view(shape[0], -1)
    n_out = max(1, int(OUTLIER_CHANNELS * flat.shape[1]))
    columns = torch.randperm(flat.shape[1], generator=gen)[:n_out]
    flat[:, columns] *= OUTLIER_GAIN
    flat.mul_(torch.randn(shape[0], 1, generator=gen).mul_(ROW_GAIN_SIGMA).exp_())
    return w


@functools.lru_cache(maxsize=1)
def sincos_pos_embed(shape: tuple[int, ...]) -> torch.Tensor:
    """SD3's fixed 2-D sin-cos position table (tools/tiny_sd35.py), float16-rounded (cached: do not modify)."""
    return tiny_sd35.sincos_pos_embed(shape).half().float()


def draw(key: str, shape: tuple[int, ...], kind: str, seed: int = 0) -> torch.Tensor:
    """One tensor of an MMDiT state dict, float32 holding float16-representable values."""
    if key.endswith("pos_embed"):
        return sincos_pos_embed(tuple(shape))
    gen = _generator(seed, key)
    if key.rsplit(".", 1)[-1] == "bias":
        t = torch.randn(shape, generator=gen).mul_(0.01)
    elif len(shape) <= 1:
        t = torch.randn(shape, generator=gen).mul_(0.05).add_(1.0)
    else:
        t = matrix(shape, kind, gen)
    return t.half().float()


def fill_(module: torch.nn.Module, kind: str, seed: int = 0) -> torch.nn.Module:
    """Set every parameter and buffer of `module` in place (ComfyUI builds models uninitialised)."""
    with torch.no_grad():
        for key, tensor in module.state_dict(keep_vars=True).items():
            tensor.data.copy_(draw(key, tuple(tensor.shape), kind, seed))
    return module
