"""Diffusion transformer (DiT; Peebles & Xie 2023, arXiv 2212.09748): the image cut into patches as tokens, a stack
of transformer blocks conditioned by adaLN-zero on the time, the class and (MeanFlow) the interval, and the patches
put back. A VelocityNet like the U-Net: `model(x, t, y, t_end)`, built from the same config
(`--backbone dit`), so loss, solvers, EMA, guidance, export, torch.hub and resume take it unchanged."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unet import ModelConfig, VelocityNet


def positions(side: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (side², width): half the channels for rows, half for columns."""
    quarter = width // 4
    freqs = torch.exp(-math.log(10_000) * torch.arange(quarter, dtype=torch.float64) / quarter)
    grid = torch.arange(side, dtype=torch.float64)[:, None] * freqs[None]  # (side, quarter)
    rows, cols = (torch.cat([g.sin(), g.cos()], 1) for g in (grid, grid))
    return torch.cat([rows[:, None].expand(side, side, -1), cols[None].expand(side, side, -1)], -1).reshape(
        side * side, -1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, W) normalised elsewhere, shifted and scaled per image by (B, W)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention and an MLP, each behind a LayerNorm that the conditioning shifts and scales, and each gated by
    it; the gates start at zero (adaLN-zero), so the block starts as the identity."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, W) tokens, c: (B, W) conditioning -> (B, N, W)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=1)
        b, n, w = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.heads, -1).permute(
            2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        x = x + gate1[:, None] * self.proj(attended)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(VelocityNet, library_name="pytorch", license="mit", tags=["rectified-flow", "flow-matching", "dit"]):
    """DiT v(x, t, y): x (B, C, H, W), t (B,) in [0, 1], y (B,) class indices or None; cfg.base_channels is the token
    width, cfg.depth the blocks, cfg.head_channels the channels per attention head, cfg.patch_size the patch side."""

    backbone = "dit"

    def build(self, cfg: ModelConfig, width: int) -> None:
        """Patch embedding, fixed positions, the blocks and the zero-initialised adaLN output layer."""
        p = cfg.patch_size
        self.patch = nn.Conv2d(cfg.in_channels, width, p, stride=p)
        self.register_buffer("pos", positions(cfg.image_size // p, width), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(width, width // cfg.head_channels, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, p * p * cfg.in_channels)
        for layer in (self.ada, self.out):  # the output starts at zero, as the U-Net's does
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                t_end: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, C, H, W) at x_t, or with t_end (B,) the average velocity over [t, t_end] (None: t_end = t);
        y may hold num_classes (the null token) for guidance."""
        c = self.conditioning(t, y, t_end)
        b, ch, side, p = x.shape[0], self.config.in_channels, self.config.image_size // self.config.patch_size, \
            self.config.patch_size
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=1)
        h = self.out(modulate(self.norm(h), shift, scale))  # (B, side², p·p·C)
        return h.view(b, side, side, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(b, ch, side * p, side * p)
