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

from checkpoint import load_checkpoint, model_config_from, model_from_checkpoint
from device import keep_freed_memory, resolve_device
from flow import generate
from solvers import check_solver
from unet import ConditionalUNet

# The one rule for the sampler: a checkpoint's recorded sampler (recommended_sampler), wherever it is sampled;
# these defaults only for a bare model or a checkpoint that records none. Why each was chosen: docs/results-mnist.md.
DEFAULT_SOLVER = "midpoint"
DEFAULT_STEPS = 4  # midpoint: 2 NFE per step -> 8 network evaluations per image
DEFAULT_GUIDANCE = 1.0  # no guidance
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"
# what --objective meanflow checkpoints record: one jump along the average velocity from noise to data, 1 NFE
# (guidance, where wanted, is folded into training by --mf-guidance; why: docs/meanflow.md)
MEANFLOW_SAMPLER = {"solver": "meanflow", "steps": 1, "guidance": 1.0}


@dataclass
class Samples:
    """Images (B, C, H, W) in [0, 1], their labels (or None), and what drawing them cost.

    nfe: network evaluations per image; a guided step's cond + uncond passes count 2 (flow.generate).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    nfe: int
    seconds: float
    solver: str = DEFAULT_SOLVER  # how they were drawn
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE


def noise_seed(seed: int, i: int) -> int:
    """Generator seed of sample i under `seed`.

    torch's CPU generator keeps 32 bits of a seed. Multiplying by 2^32 / golden ratio spreads nearby seeds far
    apart there: seeds within 1,000 of each other share none of their first 1.9 million samples (with seed + i,
    seed 1 would redraw seed 0's samples shifted by one).
    """
    return (seed * 0x9E3779B1 + i) % 2**32


def make_noise(n: int, shape: tuple[int, ...], seed: int, device: torch.device | str, start: int = 0) -> torch.Tensor:
    """Noise (n, *shape) for samples start .. start + n - 1; sample i depends only on (seed, i), not on the batch size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, i)))
                        for i in range(start, start + n)]).to(device)


def check_request(n: int, batch_size: int, solver: str, steps: int) -> None:
    """Raise ValueError for a request that cannot be drawn, before any checkpoint is read or noise drawn."""
    for name, value in (("batch_size", batch_size), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 1:
        raise ValueError(f"nothing to draw: {n} images asked for (give at least one label, or n >= 1)")
    check_solver(solver, steps)


def can_guide(num_classes: int | None, label_dropout: float | None) -> bool:
    """Whether training taught the null label that guidance needs: classes and label dropout (None, unknown
    in checkpoints older than the field, is assumed)."""
    return num_classes is not None and (label_dropout is None or label_dropout > 0)


def checkpoint_can_guide(ckpt: dict) -> bool:
    """can_guide for a checkpoint's model and training configs."""
    return can_guide(model_config_from(ckpt).num_classes, (ckpt.get("train_config") or {}).get("label_dropout"))


def check_guidance(ckpt: dict, guidance: float) -> None:
    """Refuse w != 1 where training never taught the null label (--label-dropout 0); older checkpoints pass."""
    conditional = model_config_from(ckpt).num_classes is not None  # flow.guided_velocity refuses the others
    if guidance != 1.0 and conditional and not checkpoint_can_guide(ckpt):
        raise ValueError(
            f"guidance {guidance} needs the unconditional velocity, but this checkpoint was trained with "
            "--label-dropout 0, so its null-label embedding was never trained: sample with guidance 1, "
            "or train with --label-dropout 0.1 to use guidance")


def recommended_sampler(ckpt: dict, solver: str | None = None, steps: int | None = None,
                        guidance: float | None = None) -> tuple[str, int, float]:
    """(solver, steps, guidance) to sample ckpt with: the caller's choices, else those the checkpoint records
    (reflow stages record theirs), else the defaults."""
    sampler = ckpt.get("sampler") or {}
    return (sampler.get("solver", DEFAULT_SOLVER) if solver is None else solver,
            sampler.get("steps", DEFAULT_STEPS) if steps is None else steps,
            sampler.get("guidance", DEFAULT_GUIDANCE) if guidance is None else guidance)


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


@torch.no_grad()
def sample_model(
    model: nn.Module,
    n: int,
    labels: torch.Tensor | None = None,
    solver: str = DEFAULT_SOLVER,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int | None = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> Samples:
    """Draw n images in batches; conditional models without labels cycle through the classes; seed None is random.

    The NFE reported is the mean over batches (adaptive dopri5 varies; fixed-step solvers do not)."""
    check_request(n, batch_size, solver, steps)
    keep_freed_memory()  # here, not only in the scripts: a notebook's sampling gets it too
    cfg = model.config
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    if labels is None and cfg.num_classes is not None:
        labels = torch.arange(n) % cfg.num_classes
    check_labels(labels, cfg.num_classes)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    seed = int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed
    noise = make_noise(n, shape, seed, "cpu")
    start, images, nfes = time.perf_counter(), [], []
    for i in range(0, n, batch_size):
        y = labels[i:i + batch_size].to(device) if labels is not None else None
        x, nfe = generate(model, noise[i:i + batch_size].to(device), y, solver, steps, guidance, rtol, atol)
        images.append(((x + 1) / 2).cpu())
        nfes.append(nfe)
    return Samples(torch.cat(images), labels, round(sum(nfes) / len(nfes)), time.perf_counter() - start, solver, steps,
                   guidance)


def save_grid(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None,
              class_names: list[str] | None = None, scale: int = 2, ncol: int | None = None) -> Path:
    """PNG grid of images (B, C, H, W) in [0, 1]; runs of equal labels become labelled rows, else rows of ncol
    (default: a square)."""
    rows = _label_rows(labels)
    ncol = len(images) // len(rows) if rows else ncol or math.ceil(math.sqrt(len(images)))
    nrow = len(rows) if rows else math.ceil(len(images) / ncol)
    c, h, w = images.shape[1:]
    pad, margin = 2, (16 if rows else 0)
    grid = Image.new("RGB", (margin + ncol * (w + pad) + pad, nrow * (h + pad) + pad), "white")
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, img in enumerate(pixels):
        tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB")
        grid.paste(tile, (margin + pad + (i % ncol) * (w + pad), pad + (i // ncol) * (h + pad)))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(rows):
        name = class_names[label] if class_names else str(label)
        draw.text((4, (pad + r * (h + pad) + h // 2) * scale - 6), name[:6], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _label_rows(labels: torch.Tensor | None) -> list[int]:
    """Row labels when labels form equal-length runs (e.g. 0,0,1,1,2,2), else []."""
    if labels is None or len(labels) == 0:
        return []
    values, counts = torch.unique_consecutive(labels, return_counts=True)
    if len(values) < 2 or (counts != counts[0]).any():
        return []
    return values.tolist()


@dataclass
class Loaded:
    """A checkpoint made ready to sample: the model on its device, the dict it came from, and the sampler to use."""

    model: ConditionalUNet
    ckpt: dict
    solver: str
    steps: int
    guidance: float


def load_for_sampling(checkpoint: str | Path | dict, solver: str | None = None, steps: int | None = None,
                      guidance: float | None = None, device: str | torch.device | None = None,
                      use_ema: bool = True) -> Loaded:
    """Read a checkpoint (or take the dict load_checkpoint gave), resolve its sampler and build its model.

    The one path from a file to a model that samples: solver, steps and guidance left at None take what the
    checkpoint records (recommended_sampler); guidance is refused where training never taught the null label.
    """
    device = resolve_device(device)
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location="cpu")
    solver, steps, guidance = recommended_sampler(ckpt, solver, steps, guidance)
    check_solver(solver, steps)
    check_guidance(ckpt, guidance)
    return Loaded(model_from_checkpoint(ckpt, use_ema).to(device), ckpt, solver, steps, guidance)


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
                known = f"one of {', '.join(names)}" if names else "class indices: this checkpoint records no class names"
                raise ValueError(f"unknown label {label!r}: labels are {known}")
            indices.append(names[label])
        elif isinstance(label, numbers.Integral) or (isinstance(label, torch.Tensor) and label.dim() == 0):
            indices.append(int(label))
        else:
            raise ValueError(f"labels are class indices (integers) or class names, got {label!r}")
    return torch.tensor(indices, dtype=torch.long)


def sample_from_checkpoint(
    checkpoint: str | Path | dict,
    out_path: str | Path | None = None,
    steps: int | None = None,
    batch_size: int = 4,
    solver: str | None = None,
    guidance: float | None = None,
    labels: Sequence[int | str] | torch.Tensor | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    use_ema: bool = True,
) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] from a checkpoint file alone (or its dict); writes a grid PNG when out_path is given.

    B is len(labels) when labels are given (class indices, or class names where the checkpoint records them),
    else batch_size (class-conditional models then cycle through their classes). solver, steps and guidance
    left at None take the sampler the checkpoint records (a one-step model samples in one step). seed None
    draws a random seed; device None or "auto" is CUDA, then MPS, then the CPU. For the NFE and timing of a
    draw, use load_for_sampling and sample_model.
    """
    n = len(labels) if labels is not None else batch_size
    check_request(n, batch_size, DEFAULT_SOLVER if solver is None else solver, DEFAULT_STEPS if steps is None else steps)
    loaded = load_for_sampling(checkpoint, solver, steps, guidance, device, use_ema)
    class_names = loaded.ckpt.get("class_names")
    if labels is not None:
        labels = label_tensor(labels, class_names)
    samples = sample_model(loaded.model, n, labels, loaded.solver, loaded.steps, loaded.guidance, seed, batch_size)
    if out_path is not None:
        save_grid(samples.images, out_path, samples.labels, class_names)
    return samples.images
