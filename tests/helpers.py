"""Tiny models and data that make trainer tests take seconds."""
from pathlib import Path

import torch

from data import TensorImages
from trainer import TrainConfig
from unet import UNetConfig

TINY = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), dropout=0.1, num_classes=3)


def blobs(n: int = 96, seed: int = 0) -> TensorImages:
    """Three classes of 8x8 uint8 images: a bright square at a class-specific place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = (torch.rand(n, 8, 8, generator=g) * 40).to(torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 2 * y:2 * y + 3, 2 * y:2 * y + 3] = 255
    return TensorImages(images, labels, 8)


def tiny_config(tmp: Path, **overrides) -> TrainConfig:
    """A TrainConfig writing everything under tmp."""
    base = dict(epochs=2, batch_size=16, lr=2e-3, log_every=2, out_dir=str(tmp / "ck"), checkpoint=str(tmp / "best.pth"),
                sample_dir=str(tmp / "samples"), val_t_points=2, keep_last=0)
    return TrainConfig(**{**base, **overrides})
