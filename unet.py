"""Conditional U-Net that predicts the rectified-flow velocity v(x_t, t, y), or with `average_velocity` the
MeanFlow average velocity u(x_t, t, t_end, y) over [t, t_end] (u(x_t, t, t, y) is the velocity v)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin  # from_pretrained (folder or Hub id), save_pretrained, push_to_hub
from torch import nn

GROUPS = 8  # GroupNorm groups, as in FlowGen
WEIGHTS, CONFIG = "model.safetensors", "config.json"  # an exported folder's files that rebuild the model


@dataclass
class ModelConfig:
    """A velocity network's config, either backbone's (`backbone`: the U-Net or the DiT); stored in every checkpoint."""

    image_size: int = 28  # side of the square input in pixels
    in_channels: int = 1  # 1 for MNIST, 3 for RGB
    base_channels: int = 64  # channels at full resolution (multiple of 8)
    channel_mult: tuple[int, ...] = (1, 2, 2)  # channel multiplier per level; len-1 downsamplings
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_resolutions: tuple[int, ...] = (7,)  # feature-map sides (pixels) that get self-attention
    dropout: float = 0.1  # dropout inside ResBlocks
    num_classes: int | None = 10  # classes; none = an unconditional model (index num_classes is the "no label" token)
    head_channels: int = 32  # channels per attention head
    upsample_conv: bool = True  # a 3x3 conv after each nearest upsampling (off: the next ResBlock's conv mixes)
    average_velocity: bool = False  # also embed t_end - t: u(x_t, t, t_end) over [t, t_end] (--objective meanflow)
    backbone: str = "unet"  # unet | dit (a diffusion transformer: dit.py; base_channels is then its token width)
    patch_size: int = 2  # dit: the side of a patch, one token each
    depth: int = 6  # dit: transformer blocks


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t in [0, 1] followed by a two-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) -> (B, dim)."""
        half, dtype = self.freq_dim // 2, self.mlp[0].weight.dtype  # fp32 (under autocast too), or fp64 in tests
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=dtype) / half)
        # Scale t to [0, 1000] so the usual diffusion frequencies resolve small steps in t.
        args = 1000 * t.to(dtype)[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=1))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time/class embedding as a scale and shift."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(GROUPS, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, in_ch, H, W), emb: (B, emb_dim) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Block(nn.Module):
    """A ResBlock optionally followed by self-attention: the unit each U-Net level stacks."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attention: bool, head_channels: int):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = SelfAttentionBlock(out_ch, head_channels) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class VelocityNet(nn.Module, PyTorchModelHubMixin):
    """A velocity network v(x, t, y) or, with `average_velocity`, u(x, t, t_end, y), built from a checked ModelConfig:
    the U-Net below or the DiT (dit.py). Both embed t, t_end - t and the class the same way, and load from an
    exported folder or a Hugging Face Hub repo id (`from_pretrained`)."""

    backbone = ""  # the ModelConfig.backbone a subclass builds
    embed_mult = 1  # the embeddings' width in base_channels

    def __init__(self, config: ModelConfig | dict | None = None, **kwargs):
        super().__init__()
        if isinstance(config, dict):  # config.json read back (the Hub mixin passes its keys again as kwargs)
            config, kwargs = config_from_dict(config), {}
        cfg = config or config_from_dict(kwargs)
        check_config(cfg)
        if cfg.backbone != self.backbone:
            raise ValueError(f"this config builds a {cfg.backbone}, not a {self.backbone}: load it with "
                             "load_for_sampling")
        self.config, dim = cfg, self.embed_mult * cfg.base_channels
        self.time_embed = TimeEmbedding(dim)
        # MeanFlow (Geng et al. 2025, Table 1c) embeds (t, t - r); here (t, t_end - t), which is 0 for the velocity
        self.interval_embed = TimeEmbedding(dim) if cfg.average_velocity else None
        self.class_embed = nn.Embedding(cfg.num_classes + 1, dim) if cfg.num_classes is not None else None
        self.build(cfg, dim)  # the backbone's layers, after the embeddings

    def conditioning(self, t: torch.Tensor, y: torch.Tensor | None, t_end: torch.Tensor | None) -> torch.Tensor:
        """(B, D): the time embedding, plus the interval embedding of t_end - t (average-velocity models) and the
        class embedding."""
        if (y is None) != (self.class_embed is None):
            raise ValueError("labels y must be given exactly when the model is class-conditional "
                             f"(num_classes={self.config.num_classes}, y {'missing' if y is None else 'given'})")
        emb = self.time_embed(t)
        if self.interval_embed is not None:
            emb = emb + self.interval_embed(torch.zeros_like(t) if t_end is None else t_end - t)
        elif t_end is not None:
            raise ValueError("this model predicts the velocity at t only: an end time t_end needs a model trained "
                             "with --objective meanflow")
        return emb + self.class_embed(y) if y is not None else emb

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs) -> VelocityNet:
        """The model of an exported folder (`pretrained.py export`), or of a Hugging Face Hub repo id ("user/name",
        downloaded by the Hub mixin). A path that looks local (it exists, its parent folder does, or it is not
        user/name) but holds no model is refused in one line, without asking the Hub."""
        name = str(pretrained_model_name_or_path)
        folder = Path(name).expanduser()
        local = folder.exists() or folder.parent.exists() and str(folder.parent) != "." or name.count("/") != 1 \
            or name.startswith((".", "/", "~"))
        if local and not ((folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()):
            raise ValueError(f"{name} is not an exported model folder ({CONFIG} + {WEIGHTS}"
                             f"{'' if folder.exists() else ': no such folder'}): make one with `python pretrained.py "
                             "export`, or give a Hugging Face Hub repo id (user/name)")
        try:
            return super().from_pretrained(folder if local else name, *args, **kwargs)
        except RuntimeError as e:  # a config.json and weights that do not belong together
            raise ValueError(f"{name}: the weights do not match {CONFIG} ({str(e).strip().splitlines()[-1].strip()})"
                             ) from None


class ConditionalUNet(VelocityNet, library_name="pytorch", license="mit", tags=["rectified-flow", "flow-matching"]):
    """U-Net v(x, t, y): x (B, C, H, W) in [-1, 1]-scale, t (B,) in [0, 1], y (B,) class indices or None."""

    backbone, embed_mult = "unet", 4

    def build(self, cfg: ModelConfig, emb_dim: int) -> None:
        """Stem, the down path with its skips, the middle, the up path and the zero-initialised output conv."""
        ch = cfg.base_channels
        self.stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels, res, cur = [ch], cfg.image_size, ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = cfg.base_channels * mult
                attention = res in cfg.attention_resolutions
                self.down.append(Block(cur, out, emb_dim, cfg.dropout, attention, cfg.head_channels))
                skip_channels.append(out)
                cur = out
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skip_channels.append(cur)
                res //= 2

        attn_mid = SelfAttentionBlock(cur, cfg.head_channels)
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, cfg.dropout), attn_mid,
                                  ResBlock(cur, cur, emb_dim, cfg.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                out = cfg.base_channels * mult
                attention = res in cfg.attention_resolutions
                skip = skip_channels.pop()
                self.up.append(Block(cur + skip, out, emb_dim, cfg.dropout, attention, cfg.head_channels))
                cur = out
            if level > 0:
                upsample = nn.Upsample(scale_factor=2, mode="nearest")
                conv = nn.Conv2d(cur, cur, 3, padding=1) if cfg.upsample_conv else None
                self.up.append(nn.Sequential(upsample, conv) if conv is not None else upsample)
                res *= 2

        self.out = nn.Sequential(nn.GroupNorm(GROUPS, cur), nn.SiLU(), nn.Conv2d(cur, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                t_end: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, C, H, W) at x_t, or with t_end (B,) the average velocity over [t, t_end] (None: t_end = t);
        y may hold num_classes (the null token) for guidance."""
        emb = self.conditioning(t, y, t_end)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Block) else layer(h)
            skips.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, Block) else layer(h)
        return self.out(h)


def config_from_dict(stored: dict) -> ModelConfig:
    """ModelConfig from its JSON form (lists back to tuples); unknown keys are refused."""
    unknown = set(stored) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown U-Net config keys {sorted(unknown)}: written by newer code, or not a U-Net config")
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


BACKBONES = ("unet", "dit")


# the largest value each size field may take: past these a network is too big to build on any machine here
SIZE_LIMITS = {"image_size": 1024, "in_channels": 64, "base_channels": 4096, "num_res_blocks": 32,
               "head_channels": 4096, "patch_size": 64, "depth": 256}


def check_config(cfg: ModelConfig) -> None:
    """Raise ValueError with a readable message when the model cannot be built for cfg."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown --backbone {cfg.backbone!r}: choose one of {', '.join(BACKBONES)}")
    for name, most in SIZE_LIMITS.items():
        if not 1 <= getattr(cfg, name) <= most:
            raise ValueError(f"--{name.replace('_', '-')} must lie in 1..{most}, got {getattr(cfg, name)}")
    if not cfg.channel_mult or not all(1 <= m <= 64 for m in cfg.channel_mult) or len(cfg.channel_mult) > 8:
        raise ValueError(f"--channel-mult takes 1 to 8 multipliers in 1..64, got "
                         f"{','.join(map(str, cfg.channel_mult)) or 'none'}")
    if cfg.num_classes is not None and not 1 <= cfg.num_classes <= 100_000:
        raise ValueError(f"--num-classes must lie in 1..100000 (or none: unconditional), got {cfg.num_classes}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must lie in [0, 1), got {cfg.dropout}")
    if cfg.backbone == "dit":
        if cfg.patch_size < 1 or cfg.image_size % cfg.patch_size or cfg.depth < 1:
            raise ValueError(f"a DiT cuts {cfg.image_size} px images into patches of --patch-size {cfg.patch_size} "
                             f"(a divisor: 2 or 4 for 28 and 32 px) and stacks --depth {cfg.depth} >= 1 blocks")
        if cfg.base_channels % cfg.head_channels or cfg.base_channels % 4:
            raise ValueError(f"the DiT's width --base-channels {cfg.base_channels} must be a multiple of 4 and of "
                             f"--head-channels {cfg.head_channels}")
        return
    factor = 2 ** (len(cfg.channel_mult) - 1)
    if cfg.image_size < factor or cfg.image_size % factor:
        raise ValueError(
            f"image size {cfg.image_size} cannot go through {len(cfg.channel_mult) - 1} downsamplings: "
            f"use a multiple of {factor} (e.g. 28 with 3 levels, 32/64/128 with 3-4 levels)"
        )
    sides = [cfg.image_size // 2**i for i in range(len(cfg.channel_mult))]
    unused = [r for r in cfg.attention_resolutions if r not in sides]
    if unused:
        raise ValueError(f"attention resolution(s) {unused} match no level of this U-Net (feature maps of "
                         f"{', '.join(map(str, sides))} px): pick from those, or none")
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    if any(w % GROUPS for w in widths):
        raise ValueError(f"channel widths {widths} must be multiples of {GROUPS} (GroupNorm groups)")
