"""A small class-conditional DiT (Peebles & Xie, 2023): patchify, adaLN-Zero blocks, unpatchify.

The pack's own reference model: core tests and the demo run it with random weights; the benchmark
trains it on scikit-learn's digits. Block layout follows the paper, so the same caching engine
that drives ComfyUI's DiTs drives this one (branches `attn` and `mlp`, pre-gate outputs).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    image_size: int = 16
    channels: int = 1
    patch: int = 2
    hidden: int = 128
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    classes: int = 10          # label `classes` is the null label used for CFG

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        inner = int(hidden * ratio)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.hidden_size = cfg.hidden
        self.norm1 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg.hidden, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(cfg.hidden, cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 6 * cfg.hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.hidden, cfg.patch * cfg.patch * cfg.channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Predicts the noise (epsilon) of x_t at integer timestep t (0..999) for class y."""

    def __init__(self, cfg: DiTConfig = DiTConfig()):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch         # named as ComfyUI's DiTs name it (frequency.patch_sizes reads it)
        self.x_embedder = nn.Conv2d(cfg.channels, cfg.hidden, cfg.patch, stride=cfg.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.hidden))
        self.t_embedder = nn.Sequential(nn.Linear(256, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))
        self.y_embedder = nn.Embedding(cfg.classes + 1, cfg.hidden)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.reset_parameters()

    def reset_parameters(self, zero_gates: bool = True):
        """DiT's init. zero_gates=False gives random gates, so tests see blocks doing something."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        if zero_gates:
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b = x.shape[0]
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(timestep_embedding(t, 256)) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        side, p = cfg.image_size // cfg.patch, cfg.patch
        h = h.view(b, side, side, p, p, cfg.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, cfg.channels, cfg.image_size, cfg.image_size)

    def block_flops(self) -> dict[str, float]:
        """Multiply-add FLOPs of one block's branches for one image (2 per MAC)."""
        n, c = self.cfg.tokens, self.cfg.hidden
        attn = 2 * n * c * 3 * c + 4 * n * n * c + 2 * n * c * c
        mlp = 2 * 2 * n * c * int(c * self.cfg.mlp_ratio)
        return {"attn": float(attn), "mlp": float(mlp), "modulation": float(2 * c * 6 * c)}
