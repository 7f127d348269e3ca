"""Sampling from a model or a checkpoint file, and labelled sample grids.

`sample_from_checkpoint` needs only the file: the U-Net is rebuilt from the stored config.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw
from torch import nn

from checkpoint import RunRecord, load_checkpoint, model_config_from, model_from_checkpoint
from runlog import check_file_out
from cpu import keep_freed_memory
from device import resolve_device
from flow import can_guide
from solvers import Sampler, flow_batches, make_noise
from unet import VelocityNet

# what --objective meanflow checkpoints record: one jump along the average velocity from noise to data, 1 NFE
# (guidance, where wanted, is folded into training by --mf-guidance; why: docs/meanflow.md)
MEANFLOW_SAMPLER = Sampler("meanflow", 1, 1.0)
IMAGE_OUT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what a sample grid may be saved as


@dataclass
class SampleConfig:
    """How to sample: the flags of every script that draws from a checkpoint."""

    solver: str | None = None  # euler | midpoint | heun | rk4 | dopri5 | meanflow (default: the recorded sampler's)
    steps: int | None = None  # solver steps, ignored by dopri5 (default: the checkpoint's recorded sampler's)
    guidance: float | None = None  # classifier-free guidance w; 1 = none, 0 = unconditional (default: the recorded one)
    seed: int = 0  # noise seed: image i depends only on (seed, i), not on the batch size
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    batch_size: int = 256  # images per network batch: memory and speed, not results

    def sampler(self, record: dict | None = None) -> Sampler:
        """The sampler these flags ask for: each left unset takes the record's (a checkpoint's), else the default."""
        return Sampler.recorded(record, self.solver, self.steps, self.guidance)

    def check(self) -> None:
        """Raise ValueError for a field no sampler can use, before any checkpoint is read."""
        check_request(1, self.batch_size)
        self.sampler()


@dataclass
class Samples:
    """Images (B, C, H, W) in [0, 1], their labels (or None), what drawing them cost (nfe: network evaluations per
    image, Sampler.nfe) and the sampler that drew them."""

    images: torch.Tensor
    labels: torch.Tensor | None
    nfe: int
    seconds: float
    sampler: Sampler


def check_request(n: int, batch_size: int) -> None:
    """Raise ValueError for a count that cannot be drawn, before any checkpoint is read or noise drawn (the sampler
    checks itself when made)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ValueError(f"batch_size must be a whole number, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 1:
        raise ValueError(f"nothing to draw: {n} images asked for (give at least one label, or n >= 1)")


def checkpoint_can_guide(ckpt: dict) -> bool:
    """can_guide for a checkpoint's model and training configs."""
    return can_guide(model_config_from(ckpt).num_classes, (ckpt.get("train_config") or {}).get("label_dropout"))


def check_guidance(ckpt: dict, guidance: float) -> None:
    """Refuse w != 1 where training never taught the null label (--label-dropout 0); older checkpoints pass."""
    conditional = model_config_from(ckpt).num_classes is not None  # solvers.guided_velocity refuses the others
    if guidance != 1.0 and conditional and not checkpoint_can_guide(ckpt):
        raise ValueError(
            f"guidance {guidance} needs the unconditional velocity, but this checkpoint was trained with "
            "--label-dropout 0, so its null-label embedding was never trained: sample with guidance 1, "
            "or train with --label-dropout 0.1 to use guidance")


def check_labels(labels: torch.Tensor | None, num_classes: int | None, n: int | None = None,
                 null_ok: bool = False) -> None:
    """Raise ValueError unless labels fit the model's classes (and, given n, are one per image of n);
    null_ok admits num_classes, the null label."""
    if labels is None:
        return
    if n is not None and labels.shape != (n,):
        raise ValueError(f"labels must be one per image: {n} images, labels of shape {tuple(labels.shape)}")
    if num_classes is None:
        raise ValueError("this model is unconditional: it takes no labels")
    bad = labels[(labels < 0) | (labels >= num_classes + null_ok)]
    if len(bad):
        raise ValueError(f"label {int(bad[0])} is out of range: this model knows classes 0-{num_classes - 1}")


def sample_model(model: nn.Module, n: int, labels: torch.Tensor | None = None, sampler: Sampler = Sampler(),
                 seed: int | None = 0, batch_size: int = 256) -> Samples:
    """Draw n images on the model's device; conditional models without labels cycle through the classes; seed None
    is random."""
    check_request(n, batch_size)
    keep_freed_memory()  # here, not only in the scripts: a notebook's sampling gets it too
    cfg = model.config
    if labels is None and cfg.num_classes is not None:
        labels = torch.arange(n) % cfg.num_classes
    check_labels(labels, cfg.num_classes)
    seed = int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed
    noise = make_noise(n, (cfg.in_channels, cfg.image_size, cfg.image_size), seed, "cpu")
    start = time.perf_counter()
    x, nfe = flow_batches(model, noise, labels, sampler, batch_size=batch_size)
    return Samples((x + 1) / 2, labels, nfe, time.perf_counter() - start, sampler)


def save_grid(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None,
              class_names: list[str] | None = None, scale: int = 2, ncol: int | None = None) -> Path:
    """PNG grid of images (B, C, H, W) in [0, 1]: with labels, one row per class in class order (whatever the order
    they were asked in), named in a margin wide enough for the longest name; else rows of ncol (default: a square)."""
    n, (c, h, w) = len(images), images.shape[1:]
    if labels is not None and n:
        rows = sorted(set(labels.tolist()))
        seen = {label: 0 for label in rows}
        cells = []
        for label in labels.tolist():
            cells.append((rows.index(label), seen[label]))
            seen[label] += 1
        ncol = max(seen.values())
    else:
        rows, ncol = [], ncol or math.ceil(math.sqrt(n))
        cells = [(i // ncol, i % ncol) for i in range(n)]
    names = [class_names[label] if class_names else str(label) for label in rows]
    pad, nrow = 2, max((r for r, _ in cells), default=0) + 1
    margin = math.ceil((10 + 6 * max(map(len, names))) / scale) if names else 0  # PIL's default font: ~6 px a character
    grid = Image.new("RGB", (margin + ncol * (w + pad) + pad, nrow * (h + pad) + pad), "white")
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for img, (r, col) in zip(pixels, cells):
        tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB")
        grid.paste(tile, (margin + pad + col * (w + pad), pad + r * (h + pad)))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(grid)
    for r, name in enumerate(names):
        draw.text((4, (pad + r * (h + pad) + h // 2) * scale - 6), name, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def check_image_out(path: str | Path, flag: str = "--out") -> None:
    """An image path save_grid can write: a known extension, and a writable place (checked before any sampling)."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_OUT:
        raise ValueError(f"{flag} {path}: give an image file name ending in {', '.join(IMAGE_OUT)}")
    check_file_out(path, flag)


def grid_request(num_classes: int | None) -> tuple[int, torch.Tensor | None]:
    """(images, labels) of a training run's sample grid: 10 per class for up to 10 classes, or 64 without classes."""
    if num_classes is None:
        return 64, None
    labels = torch.arange(min(num_classes, 10)).repeat_interleave(10)
    return len(labels), labels


def draw_grid(model: VelocityNet, path: Path, sampler: Sampler, class_names: list[str] | None) -> Path:
    """A training run's sample grid at path: one row per class (up to 10), or 64 images, drawn with sampler."""
    n, labels = grid_request(model.config.num_classes)
    samples = sample_model(model, n, labels, sampler, seed=0)
    return save_grid(samples.images, path, samples.labels, class_names)


@dataclass
class Loaded:
    """A checkpoint made ready to sample: the model on its device, the dict it came from, and the sampler to use."""

    model: VelocityNet
    ckpt: dict
    sampler: Sampler

    @property
    def record(self) -> RunRecord:
        """What the run that made the model was: kind, class names, dataset, lineage."""
        return RunRecord.read(self.ckpt)


def load_for_sampling(checkpoint: str | Path | dict, solver: str | None = None, steps: int | None = None,
                      guidance: float | None = None, device: str | torch.device | None = None,
                      use_ema: bool = True) -> Loaded:
    """Read a checkpoint (or take the dict load_checkpoint gave), resolve its sampler and build its model.

    The one path from a file to a model that samples: solver, steps and guidance left at None take what the
    checkpoint records (Sampler.recorded); guidance is refused where training never taught the null label.
    """
    Sampler.recorded(None, solver, steps, guidance)  # the caller's choices refused before the file is read
    device = resolve_device(device)
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location="cpu")
    sampler = Sampler.recorded(ckpt.get("sampler"), solver, steps, guidance)
    check_guidance(ckpt, sampler.guidance)
    return Loaded(model_from_checkpoint(ckpt, use_ema).to(device), ckpt, sampler)


def label_tensor(labels: Sequence[int | str] | torch.Tensor, class_names: list[str] | None) -> torch.Tensor:
    """Labels as class indices (L,): integers, or class names where the checkpoint records them."""
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels are class indices (integers), got a {labels.dtype} tensor")
        return labels.long().flatten()
    labels = list(labels)
    names = {name: i for i, name in enumerate(class_names or [])}
    indices = []
    for label in labels:
        if isinstance(label, str):
            if label not in names:
                known = (f"one of {', '.join(names)}" if names else
                         "class indices: this checkpoint records no class names")
                raise ValueError(f"unknown label {label!r}: labels are {known}")
            indices.append(names[label])
        elif isinstance(label, numbers.Integral) or (isinstance(label, torch.Tensor) and label.dim() == 0):
            indices.append(int(label))
        else:
            raise ValueError(f"labels are class indices (integers) or class names, got {label!r}")
    return torch.tensor(indices, dtype=torch.long)


def sample_from_checkpoint(checkpoint_path: str | Path | dict, out_path: str | Path | None = None,
                           steps: int | None = None, batch_size: int = 4, solver: str | None = None,
                           guidance: float | None = None, labels: Sequence[int | str] | torch.Tensor | None = None,
                           seed: int | None = None, device: str | torch.device | None = None,
                           use_ema: bool = True) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] from a checkpoint file or exported folder alone (or its dict); writes a grid PNG
    when out_path is given. FlowGen's call, `sample_from_checkpoint(checkpoint_path=..., out_path=..., steps=...,
    batch_size=...)`, works as it writes it.

    B is len(labels) when labels are given (class indices, or class names where the checkpoint records them),
    else batch_size (class-conditional models then cycle through their classes). solver, steps and guidance
    left at None take the sampler the checkpoint records (a one-step model samples in one step). seed None
    draws a random seed; device None or "auto" is CUDA, then MPS, then the CPU. For the NFE and timing of a
    draw, use load_for_sampling and sample_model.
    """
    n = len(labels) if labels is not None else batch_size
    check_request(n, batch_size)
    if out_path is not None:
        check_image_out(out_path, "out_path")
    loaded = load_for_sampling(checkpoint_path, solver, steps, guidance, device, use_ema)
    class_names = loaded.record.class_names
    if labels is not None:
        labels = label_tensor(labels, class_names)
    samples = sample_model(loaded.model, n, labels, loaded.sampler, seed, batch_size)
    if out_path is not None:
        save_grid(samples.images, out_path, samples.labels, class_names)
    return samples.images
