"""Use the flow as a flow: invert real images to their noise, swap their class, interpolate between two of them.

A rectified flow is an invertible map: the ODE that turns noise into an image, run from t = 1 back to t = 0,
turns an image into its noise. Regenerating that noise with another label keeps what the label does not
decide (for digits: slant, thickness, size) and redraws the class.

    python editing.py invert --checkpoint checkpoints/flow_matching_mnist.pth --data-root DATA --indices 0-7
    python editing.py swap --checkpoint checkpoints/flow_matching_mnist.pth --data-root DATA --indices 0-7
    python editing.py interpolate --checkpoint checkpoints/flow_matching_mnist.pth --data-root DATA --pairs 0:1,2:3

From a notebook: `invert_from_checkpoint(path, images, labels)` -> noise, the inverse of `sample_from_checkpoint`.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall shared CPUs

import torch
from torch import nn

from checkpoint import MNIST_TRAINED
from cli import add_flags, add_weights_flag, config_from, run
from data import DataError, ImageFolder, find_images, load_mnist, readable
from runlog import check_file_out
from sampling import (Loaded, SampleConfig, check_guidance, check_image_out, check_labels, check_request, label_tensor,
                      load_for_sampling, save_grid)
from solvers import Sampler, flow_batches


@dataclass
class Inverted:
    """Noise (B, C, H, W) at t = 0 of images, the labels used, and what inverting them cost."""

    noise: torch.Tensor
    labels: torch.Tensor | None
    nfe: int  # network evaluations per image
    seconds: float


def check_images(images: torch.Tensor, labels: torch.Tensor | None, model: nn.Module) -> None:
    """Raise ValueError unless images (B, C, H, W) in [0, 1] fit the model and labels (B,) match them."""
    cfg = model.config
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"images must be (B, {', '.join(map(str, want))}) for this model, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floats in [0, 1], got {images.dtype} (divide uint8 pixels by 255)")
    if not torch.isfinite(images).all():
        raise ValueError(f"images hold {int((~torch.isfinite(images)).sum())} NaN or infinite values: pass pixels in "
                         "[0, 1]")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"images must lie in [0, 1], got values from {low:.3g} to {high:.3g}")
    check_labels(labels, cfg.num_classes, len(images))


def inversion_sampler(loaded: Loaded, solver: str | None, steps: int | None) -> Sampler:
    """The sampler to invert with: the loaded one (the caller's choices over the checkpoint's record), except that a
    recorded meanflow jump (forwards only) gives way to the default ODE solver on the model's u(x, t, t) = v."""
    if solver is None and loaded.sampler.solver == "meanflow":
        return replace(loaded.sampler, solver=Sampler.solver, steps=Sampler.steps if steps is None else steps)
    return loaded.sampler


def invert_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                 sampler: Sampler = Sampler(), batch_size: int = 256) -> Inverted:
    """Noise (B, C, H, W) of images (B, C, H, W) in [0, 1] under their labels (conditional models), in batches."""
    check_request(len(images), batch_size)
    check_images(images, labels, model)
    start = time.perf_counter()
    noise, nfe = flow_batches(model, images * 2 - 1, labels, sampler, True, batch_size)
    return Inverted(noise, labels, nfe, time.perf_counter() - start)


def invert_from_checkpoint(checkpoint: str | Path | dict, images: torch.Tensor, labels: torch.Tensor | None = None,
                           solver: str | None = None, steps: int | None = None, guidance: float | None = None,
                           device: str | torch.device | None = None, use_ema: bool = True,
                           batch_size: int = 256) -> torch.Tensor:
    """Noise (B, C, H, W) that the checkpoint's flow maps to images (B, C, H, W) in [0, 1] with labels (B,).

    The inverse of sample_from_checkpoint: the same sampler rule (solver, steps and guidance left at None take
    what the checkpoint records; a meanflow jump becomes the default ODE solver), run from t = 1 back to t = 0.
    """
    loaded = load_for_sampling(checkpoint, solver, steps, guidance, device, use_ema)
    labels = label_tensor(labels, loaded.record.class_names) if labels is not None else None
    return invert_model(loaded.model, images, labels, inversion_sampler(loaded, solver, steps), batch_size).noise


def regenerate(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor | None, sampler: Sampler,
               batch_size: int = 256) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] from given noise (B, C, H, W): the forward half of an edit."""
    return (flow_batches(model, noise, labels, sampler, False, batch_size)[0] + 1) / 2


def class_swap(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
               sampler: Sampler = Sampler()) -> torch.Tensor:
    """Each image (B, C, H, W) in [0, 1] redrawn as every target class: (B, T, C, H, W). Inversion runs under the
    image's own label at w = 1 (the flow that maps its noise to it exactly); the regeneration under each target label at
    the sampler's guidance w."""
    check_labels(targets, model.config.num_classes)
    noise = invert_model(model, images, labels, replace(sampler, guidance=1.0)).noise
    swapped = regenerate(model, noise.repeat_interleave(len(targets), 0), targets.repeat(len(images)), sampler)
    return swapped.view(len(images), len(targets), *images.shape[1:])


def slerp(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (K, ...) between a and b (...) at weights (K,) in [0, 1]: Gaussian noise keeps its
    norm (about sqrt(D)) on the way, where a straight line would pass through low-norm, unlikely noise."""
    fa, fb = a.flatten().double(), b.flatten().double()
    angle = torch.arccos((fa @ fb / (fa.norm() * fb.norm())).clamp(-1, 1))
    if angle < 1e-6:  # (nearly) the same direction: the straight line is the arc
        out = (1 - weights.double())[:, None] * fa + weights.double()[:, None] * fb
    else:
        w = weights.double()[:, None]
        out = (torch.sin((1 - w) * angle) * fa + torch.sin(w * angle) * fb) / torch.sin(angle)
    return out.to(a.dtype).view(len(weights), *a.shape)


def interpolate_images(model: nn.Module, pair: torch.Tensor, labels: torch.Tensor | None, frames: int = 8,
                sampler: Sampler = Sampler()) -> torch.Tensor:
    """frames images (frames, C, H, W) in [0, 1] from pair[0] to pair[1] (2, C, H, W) through their inverted noises. Two
    images of one class interpolate under that label; of two classes, under the null label (the unconditional flow, w =
    0), which needs a model trained with label dropout; the sampler's guidance is not used."""
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (the two ends), got {frames}")
    two_classes = labels is not None and labels[0] != labels[1]
    sampler = replace(sampler, guidance=0.0 if two_classes else 1.0)  # w = 0: the unconditional velocity
    noise = invert_model(model, pair, labels, sampler).noise
    path = slerp(noise[0], noise[1], torch.linspace(0, 1, frames))
    path_labels = labels[:1].repeat(frames) if labels is not None else None
    return regenerate(model, path, path_labels, sampler)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio (B,) in dB between images (B, ...) in [0, 1]."""
    mse = (a - b).square().flatten(1).mean(1).clamp_min(1e-12)
    return -10 * torch.log10(mse)


def gaussianity(noise: torch.Tensor) -> dict:
    """How much noise (B, ...) looks like N(0, I), per image then averaged: mean, std, excess kurtosis and the
    Kolmogorov-Smirnov distance of its values from the N(0, 1) CDF (about 0.87 / sqrt(D) for real Gaussian noise)."""
    x = noise.flatten(1).double()
    d = x.shape[1]
    cdf = torch.special.ndtr(x.sort(1).values)
    rank = torch.arange(1, d + 1, dtype=torch.float64)
    ks = torch.maximum(rank / d - cdf, cdf - (rank - 1) / d).amax(1)
    z = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    return {"mean": x.mean(1).mean().item(), "std": x.std(1).mean().item(),
            "kurtosis": (z**4).mean(1).sub(3).mean().item(), "ks": ks.mean().item()}


def parse_indices(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    out = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            if int(hi or lo) < int(lo):
                raise argparse.ArgumentTypeError(f"the range {part} is reversed: write it low to high, e.g. "
                                                 f"{hi}-{lo}")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"indices look like 0-3,7 (got {text!r})")
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"indices must be >= 0 and at least one (got {text!r})")
    return out


def real_images(loaded: Loaded, data_root: str | None, image_dir: str | None, indices: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (B, C, H, W) in [0, 1] and labels at the indices: MNIST test digits, or a folder's sorted images
    (labels from class sub-folders named as the checkpoint's classes)."""
    cfg = loaded.model.config
    if data_root is not None and image_dir is not None:
        raise ValueError("--data-root and --image-dir both given: the images come from one of them, not both")
    if data_root is None and image_dir is None:
        raise ValueError("give the images: --data-root DIR (MNIST test digits) or --image-dir DIR (a folder)")
    if data_root is not None:
        data = load_mnist(data_root, train=False, image_size=cfg.image_size, download=False)
    else:
        root = Path(image_dir)
        names = loaded.record.class_names if cfg.num_classes is not None else None
        files = readable(find_images(root))
        if names:
            files = [f for f in files if f.relative_to(root).parts[0] in names]
            if not files:
                raise DataError(f"no images under {root} sit in sub-folders named as this model's classes "
                                f"({', '.join(names)})")
        data = ImageFolder(files, root, cfg.image_size, names)
    if max(indices) >= len(data):
        raise ValueError(f"index {max(indices)} is out of range: the set holds {len(data)} images")
    images, labels = zip(*(data[i] for i in indices))
    labels = torch.tensor(labels) if cfg.num_classes is not None else None
    return (torch.stack(images) + 1) / 2, labels


def parser() -> argparse.ArgumentParser:
    """editing.py's flags: per command, the images, SampleConfig's sampling flags and the command's own."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("invert", "images -> noise, and how well the noise regenerates them (PSNR)"),
                           ("swap", "redraw images as every class (one grid row per image)"),
                           ("interpolate", "frames between pairs of images through their noises (a row per pair)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--checkpoint", default=MNIST_TRAINED,
                       help="checkpoint or exported folder (default: %(default)s)")
        s.add_argument("--data-root", default=None, help="folder holding MNIST/raw: MNIST test digits")
        s.add_argument("--image-dir", default=None, help="folder of images (class sub-folders for conditional models)")
        add_weights_flag(s)
        s.add_argument("--out", default=f"samples/{name}.png" if name != "invert" else "samples/noise.pt",
                       help="file to write (default: %(default)s)")
        # a meanflow jump (forwards only) inverts with the default ODE solver; interpolation picks its own guidance
        add_flags(s, SampleConfig(), exclude=("seed", "guidance") if name == "interpolate" else ("seed",))
        if name != "interpolate":
            s.add_argument("--indices", type=parse_indices, default=parse_indices("0-7"),
                           help="which images, e.g. 0-7 or 0,5,9")
    sub.choices["swap"].add_argument("--to", type=parse_indices, default=None, help="target classes (default: all)")
    sub.choices["interpolate"].add_argument("--pairs", default="0:1", help="index pairs, e.g. 0:1,2:3")
    sub.choices["interpolate"].add_argument("--frames", type=int, default=8, help="frames per pair (default: 8)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    sample = config_from(args, SampleConfig())
    sample.check()
    if args.command == "invert":
        check_file_out(Path(args.out), "--out")
    else:
        check_image_out(args.out)
    if args.command == "interpolate" and not 2 <= args.frames <= 1000:
        raise ValueError(f"--frames must lie in 2..1000 (the two ends and those between), got {args.frames}")
    # invert runs both ways at the recorded guidance; swap inverts at w = 1 and redraws at the recorded guidance
    loaded = load_for_sampling(args.checkpoint, sample.solver, sample.steps, sample.guidance, sample.device,
                               args.weights == "ema")
    sampler = inversion_sampler(loaded, sample.solver, sample.steps)
    if args.command == "interpolate":
        return interpolate_pairs(loaded, args.data_root, args.image_dir, args.pairs, args.frames, sampler, args.out)
    images, labels = real_images(loaded, args.data_root, args.image_dir, args.indices)
    if args.command == "swap":
        return swap_classes(loaded, images, labels, args.to, sampler, args.out)
    inverted = invert_model(loaded.model, images, labels, sampler, sample.batch_size)
    back = regenerate(loaded.model, inverted.noise, labels, sampler, sample.batch_size)
    quality = psnr(back, images)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"noise": inverted.noise, "labels": labels, "indices": args.indices, **sampler.record()}, args.out)
    std = inverted.noise.flatten(1).std(1)
    print(f"wrote {args.out}: noise of {len(images)} images ({sampler}, NFE {inverted.nfe} per image, "
          f"{inverted.seconds:.2f} s); regenerated from it: PSNR {quality.mean():.2f} dB (min {quality.min():.2f}); "
          f"noise std per image {std.mean():.3f} (N(0, I): 1)")
    return {"out": args.out, "psnr": quality.tolist(), "nfe": inverted.nfe, "noise_std": std.tolist()}


def swap_classes(loaded: Loaded, images: torch.Tensor, labels: torch.Tensor | None, to: list[int] | None,
                 sampler: Sampler, out: str) -> dict:
    """editing.py swap: each image, then it redrawn as each target class, a grid row per image."""
    model, names = loaded.model, loaded.record.class_names
    if model.config.num_classes is None:
        raise ValueError("swap needs a class-conditional model: this one is unconditional")
    targets = torch.tensor(to) if to is not None else torch.arange(model.config.num_classes)
    swapped = class_swap(model, images, labels, targets, sampler)
    save_grid(torch.cat([images[:, None], swapped], 1).flatten(0, 1), out, ncol=len(targets) + 1)
    print(f"wrote {out}: a row per image (the real one first), then it redrawn as class(es) "
          f"{', '.join(names[i] if names else str(i) for i in targets.tolist())}; {sampler}")
    return {"out": out}


def interpolate_pairs(loaded: Loaded, data_root: str | None, image_dir: str | None, pairs_text: str, frames: int,
                      sampler: Sampler, out: str) -> dict:
    """editing.py interpolate: a grid row per pair, the two real images at its ends."""
    try:
        pairs = [tuple(int(i) for i in pair.split(":")) for pair in pairs_text.split(",")]
        assert all(len(pair) == 2 for pair in pairs)
    except (ValueError, AssertionError):
        raise ValueError(f"--pairs looks like 0:1,2:3 (got {pairs_text!r})")
    rows = []
    for pair in pairs:
        images, labels = real_images(loaded, data_root, image_dir, list(pair))
        if labels is not None and labels[0] != labels[1]:
            check_guidance(loaded.ckpt, 0.0)  # two classes meet under the null label
        rows.append(torch.cat([images[:1], interpolate_images(loaded.model, images, labels, frames, sampler),
                               images[1:]]))
    save_grid(torch.cat(rows), out, ncol=frames + 2)
    print(f"wrote {out}: {len(pairs)} pair(s), {frames} frames each between the two real images "
          f"(first and last columns), {sampler.solver} {sampler.steps} steps")
    return {"out": out, "pairs": pairs}


if __name__ == "__main__":
    run(main)
