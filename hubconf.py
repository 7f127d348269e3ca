"""torch.hub entry points: the committed models, or any checkpoint, as models ready to sample.

    repo = "OWNER/flow-image-generator"     # the GitHub repository; in a clone: repo = ".", with source="local"
    model = torch.hub.load(repo, "mnist_1rf")
    images = torch.hub.load(repo, "sample", model, labels=[0, 1, 2])   # (3, 1, 28, 28) in [0, 1]
    photos = torch.hub.load(repo, "sample", torch.hub.load(repo, "cifar10_1rf"), labels=["cat", "ship"])
    model.sampler   # Sampler(solver="midpoint", steps=4, guidance=1.1, ...): the recorded one that `sample` uses

Each entry returns a velocity network (unet.VelocityNet) in eval mode on `device` (None or "auto": CUDA, then MPS, then
the CPU) with its checkpoint's recorded sampler in `model.sampler` and its class names in `model.class_names`.
"""
from __future__ import annotations

import dataclasses as _dataclasses
from typing import TYPE_CHECKING

import sampling as _sampling
import solvers as _solvers
from checkpoint import PRETRAINED

if TYPE_CHECKING:  # torch.hub lists every public callable here as an entry point: the models and helpers only
    from pathlib import Path
    from typing import Sequence

    import torch

    from unet import VelocityNet

dependencies = ["torch", "safetensors", "PIL"]  # what torch.hub checks before it imports this file


def from_checkpoint(checkpoint_path: str | Path, device: str | None = None, use_ema: bool = True) -> VelocityNet:
    """The model of a checkpoint file or exported folder, with its recorded sampler and class names attached."""
    loaded = _sampling.load_for_sampling(checkpoint_path, device=device, use_ema=use_ema)
    loaded.model.sampler = loaded.sampler
    loaded.model.class_names = loaded.record.class_names
    return loaded.model


def mnist_1rf(device: str | None = None) -> VelocityNet:
    """The committed MNIST rectified flow (make train's preset to its end): midpoint, 4 steps, w = 1.1."""
    return from_checkpoint(PRETRAINED / "mnist-1rf", device)


def mnist_one_step(device: str | None = None) -> VelocityNet:
    """The committed one-step MNIST model (pretrained/mnist-meanflow, made from mnist-1rf by `make one-step`): one jump
    along its average velocity, 1 network evaluation."""
    return from_checkpoint(PRETRAINED / "mnist-meanflow", device)


def cifar10_1rf(device: str | None = None) -> VelocityNet:
    """The committed photo model (pretrained/cifar10-1rf): the `small32` preset, 60 minutes of two CPU cores on the
    CIFAR-10 test photos, class-conditional (model.class_names: airplane ... truck); 32 x 32 RGB."""
    return from_checkpoint(PRETRAINED / "cifar10-1rf", device)


def cifar10_one_step(device: str | None = None) -> VelocityNet:
    """The committed one-step photo model (pretrained/cifar10-one-step, converted from cifar10-1rf by its paths): one
    jump along its average velocity, 1 network evaluation; 32 x 32 RGB, model.class_names as cifar10_1rf's."""
    return from_checkpoint(PRETRAINED / "cifar10-one-step", device)


def sample(model: VelocityNet, labels: Sequence[int | str] | torch.Tensor | None = None, n: int = 10,
           seed: int | None = 0, **sampler) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] from an entry's model: B = len(labels) (class indices or names), else n (classes
    cycled); solver / steps / guidance given here replace the model's recorded ones."""
    if labels is not None:
        labels = _sampling.label_tensor(labels, getattr(model, "class_names", None))
        n = len(labels)
    recorded = getattr(model, "sampler", _solvers.Sampler())
    return _sampling.sample_model(model, n, labels, _dataclasses.replace(recorded, **sampler), seed).images
