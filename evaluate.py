"""How good are the samples? MNIST: a classifier's accuracy on generated digits and the Fréchet
distance in its features (with the real-vs-real floor). RGB folders: Inception FID, offline (fid.py).

    python evaluate.py train-classifier --data-root ../shared/data
    python evaluate.py mnist --checkpoint checkpoints/flow_matching_mnist.pth --n 2000
    python evaluate.py fid --checkpoint checkpoints/rf_best.pth --real-dir img_align_celeba --n 5000 --json fid.json
    python evaluate.py likelihood --checkpoint checkpoints/flow_matching_mnist.pth --data-root ../shared/data --n 1000

The MNIST distance is measured in a small CNN's 128-d penultimate features (the readers: readers.py): it is *not*
the Inception FID and must not be compared with published FIDs.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall shared CPUs

import torch
from torch import nn

from cli import add_flags, add_weights_flag, config_from, run
from data import ImageFolder, TensorImages, load_mnist
from fid import (EXTRACTOR, STATS_DIR, RealStats, frechet_distance, frechet_from_stats, gaussian_stats,
                 inception_features, precision_recall, real_files, real_floor, real_stats, to_uint8)
from likelihood import LikelihoodConfig, image_bits_per_dim
from readers import (BN_CLASSIFIER_PATH, CLASSIFIER_PATH, CLASSIFIERS, Reader, load_classifier, predict, tensors,
                     train_classifier)
from runlog import check_file_out, check_writable
from sampling import SampleConfig, Samples, check_guidance, load_for_sampling, sample_model
from solvers import Sampler, Velocity, guided_velocity, make_noise, solve

# The Fréchet reference and floor sets: class-balanced random subsets of the whole MNIST test split, which
# no model trains on or is selected by (mnist_train.py validates on held-out training digits). The split's halves
# come from different writers (NIST SD-3, SD-1), so contiguous index ranges would measure that shift instead.
REFERENCE_SEED = 0
MAX_N = 100_000  # images any measuring command draws at most (the FID's usual N is 50,000)


def reference_sets(labels: torch.Tensor, n: int, seed: int = REFERENCE_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, floor) indices into a real set with `labels`: n / 10 random digits of each class for each,
    disjoint, from one fixed permutation, so the first n of a class at a larger N include those at a smaller one."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    per_class = n // 10
    reference, floor = [], []
    for digit in range(10):
        mine = order[labels[order] == digit]
        reference.append(mine[:per_class])
        floor.append(mine[per_class:2 * per_class])
    return torch.cat(reference), torch.cat(floor)


def check_reference_size(n: int, labels: torch.Tensor) -> None:
    """--n must give two disjoint class-balanced sets of n test digits (labels: the test split's)."""
    most = int(torch.bincount(labels, minlength=10).min()) // 2 * 10
    if n < 20 or n % 10 or n > most:
        raise ValueError(f"--n must be a multiple of 10 between 20 and {most}: the reference and floor sets are two "
                         "disjoint class-balanced sets of n test digits (n / 10 of each digit)")


def mnist_quality(model: nn.Module, classifier: Reader, real: TensorImages, n: int, sampler: Sampler = Sampler(),
                  seed: int = 0, batch_size: int = 500) -> dict:
    """Conditional accuracy and Fréchet distance of n generated digits (n/10 per digit) against a reference of n real
    test digits (reference_sets), beside the real-vs-real floor (n other test digits against the same reference) and
    the excess over it, which is what compares models."""
    check_reference_size(n, real.labels)
    labels = balanced_labels(n, 10)
    samples = sample_model(model, n, labels, sampler, seed, batch_size)
    preds, fake_feats = predict(classifier, samples.images * 2 - 1)
    reference, other = reference_sets(real.labels, n)
    images = tensors(real)[0]
    _, real_feats = predict(classifier, images[reference])
    _, other_feats = predict(classifier, images[other])
    frechet, floor = frechet_distance(fake_feats, real_feats), frechet_distance(other_feats, real_feats)
    per_class = [precision_recall(real_feats[real.labels[reference] == c], fake_feats[labels == c]) for c in range(10)]
    return {"n": n, "solver": sampler.solver, "steps": sampler.steps, "nfe": samples.nfe, "seconds": samples.seconds,
            "guidance": sampler.guidance, "accuracy": (preds == labels).float().mean().item(),
            "frechet": frechet, "floor": floor, "excess": frechet - floor,
            "precision": sum(p for p, _ in per_class) / 10, "recall": sum(r for _, r in per_class) / 10,
            "reference": f"MNIST test, class-balanced random (seed {REFERENCE_SEED})"}


@torch.no_grad()
def straightness(v: Velocity, noise: torch.Tensor, steps: int = 64, few: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """How straight the sampling paths are, from noise (N, C, H, W) at t=0 along v's own Euler path of `steps` steps.
    straightness: Liu et al.'s S = E_t ||(X1 - X0) - v(X_t, t)||^2 (per pixel), 0 for exactly straight paths;
    distance[k]: RMS pixel distance (in [-1, 1] units) of the k-step Euler sample from that path's end."""
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).to(noise.device, noise.dtype)
    x, velocities = noise, []
    for t, t_next in zip(ts[:-1], ts[1:]):
        velocities.append(v(t, x))
        x = x + (t_next - t) * velocities[-1]
    chord = x - noise
    s = torch.stack([(chord - vt).square().flatten(1).mean(1) for vt in velocities]).mean()
    distance = {k: (solve(v, noise, "euler", k)[0].clamp(-1, 1) - x.clamp(-1, 1)).square().mean().sqrt().item()
                for k in few}
    return {"straightness": s.item(), "reference_steps": steps, "distance": distance, "n": len(noise)}


def straightness_of(model: nn.Module, n: int, guidance: float = 1.0, seed: int = 0) -> dict:
    """`evaluate.py straightness`: n class-balanced seeded noises through the (guided) velocity it samples with."""
    cfg, device = model.config, next(model.parameters()).device
    labels = balanced_labels(n, cfg.num_classes).to(device) if cfg.num_classes is not None else None
    noise = make_noise(n, (cfg.in_channels, cfg.image_size, cfg.image_size), seed, device)
    return {**straightness(guided_velocity(model, labels, guidance), noise), "guidance": guidance, "seed": seed}


def folder_images(folder: str, image_size: int, n: int) -> torch.Tensor:
    """The real set of fid.real_files (n images spread over the folder), center-cropped to image_size, in [0, 1]."""
    data = ImageFolder(real_files(folder, n), Path(folder), image_size)
    return (torch.stack([data[i][0] for i in range(len(data))]) + 1) / 2


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels (n,): n / num_classes of each class, grouped (0, 0, ..., 1, 1, ...)."""
    if n % num_classes:
        raise ValueError(f"--n {n} is not a multiple of the checkpoint's {num_classes} classes: class-balanced "
                         f"samples need one (e.g. --n {n // num_classes * num_classes or num_classes})")
    return torch.arange(num_classes).repeat_interleave(n // num_classes)


def generated_features(model: nn.Module, n: int, sampler: Sampler = Sampler(), seed: int = 0, batch_size: int = 500
                       ) -> tuple[torch.Tensor, Samples]:
    """Inception features (n, 2048) of n generated images, class-balanced for class-conditional models, and the draw."""
    cfg = model.config
    labels = balanced_labels(n, cfg.num_classes) if cfg.num_classes is not None else None
    samples = sample_model(model, n, labels, sampler, seed, batch_size)
    return inception_features(to_uint8(samples.images), next(model.parameters()).device), samples


def fid_quality(model: nn.Module, real: RealStats, n: int, sampler: Sampler = Sampler(), seed: int = 0,
                batch_size: int = 500) -> dict:
    """Inception FID of n generated images (class-balanced for class-conditional models) against real statistics."""
    fake, samples = generated_features(model, n, sampler, seed, batch_size)
    return {"fid": frechet_from_stats(*gaussian_stats(fake), real.mu, real.sigma), "n": n, "solver": sampler.solver,
            "steps": sampler.steps, "nfe": samples.nfe, "guidance": sampler.guidance, "seed": seed,
            "seconds": samples.seconds}


def inception_fid(model: nn.Module, real_dir: str, n: int, sampler: Sampler, seed: int = 0,
                  batch_size: int = 256, n_real: int | None = None, stats_cache: str | None = None) -> dict:
    """`evaluate.py fid`: the score of n images drawn with sampler against n_real (default n) of real_dir, the floor
    (n other real images against the same reference, where n_real = n and the folder holds 2n) and the excess over it,
    and the protocol. The real side comes first, so that a bad folder fails before minutes of sampling and a cached
    one costs nothing; class-conditional models draw the same number of images of every class."""
    cfg, n_real = model.config, n_real or n
    if n < 2:
        raise ValueError(f"--n {n}: the FID fits a covariance to the generated images, so it needs at least 2")
    if cfg.num_classes is not None:
        balanced_labels(n, cfg.num_classes)  # n must split evenly over the classes: refused before the real side
    device, cache = next(model.parameters()).device, stats_cache or STATS_DIR
    stats = real_stats(real_dir, cfg.image_size, n_real, cache, device)
    # the floor needs n other real images than the reference's n: a folder of at least 2n, and n_real = n
    floor = (real_floor(stats, real_dir, cfg.image_size, n, cache, device)
             if n_real == n and 2 * n <= len(real_files(real_dir, None)) else None)
    result = fid_quality(model, stats, n, sampler, seed, batch_size)
    per_class = n // cfg.num_classes if cfg.num_classes is not None else None
    return {**result, "floor": floor, "excess": None if floor is None else result["fid"] - floor,
            "feature_extractor": EXTRACTOR, "real_key": stats.key, "real_stats": str(stats.cache_file),
            "real_stats_cached": stats.cached, "n": n, "real_dir": str(Path(real_dir).resolve()), "n_real": n_real,
            "image_size": cfg.image_size, "num_classes": cfg.num_classes, "per_class": per_class}


def test_digits(data_root: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels (n, 1, 28, 28) and labels (n,) of the class-balanced random test digits (reference_sets)."""
    real = load_mnist(data_root, train=False, download=False)
    most = int(torch.bincount(real.labels, minlength=10).min()) * 10
    if n < 10 or n % 10 or n > most:
        raise ValueError(f"--n {n}: MNIST test digits are drawn class-balanced, so give a multiple of 10 up to {most}")
    index = reference_sets(real.labels, n)[0]
    return real.images[index], real.labels[index]


def checkpoint_likelihood(checkpoint: str, like: LikelihoodConfig, sample: SampleConfig, n: int,
                          data_root: str | None = None, real_dir: str | None = None, use_ema: bool = True) -> dict:
    """`evaluate.py likelihood`: bits/dim of n held-out images (MNIST test digits or a folder's) under a checkpoint."""
    loaded = load_for_sampling(checkpoint, "euler", 1, 1.0, sample.device, use_ema)
    model, cfg = loaded.model, loaded.model.config
    if (data_root is None) == (real_dir is None):
        raise ValueError("give the images: --data-root DIR (MNIST test digits) or --real-dir DIR (a folder)")
    if data_root is not None:
        if cfg.image_size != 28 or cfg.in_channels != 1:
            raise ValueError(f"this checkpoint draws {cfg.in_channels}x{cfg.image_size} px images: MNIST likelihoods "
                             "need 1x28 px (give --real-dir for an image-folder checkpoint)")
        pixels, labels = test_digits(data_root, n)
        source = "MNIST test digits (class-balanced random)"
    else:
        pixels, labels = to_uint8(folder_images(real_dir, cfg.image_size, n)), None
        source = f"images of {real_dir}"
    marginal = cfg.num_classes is not None and (like.marginal or labels is None)
    if cfg.num_classes is None:
        labels = None
    elif marginal:
        check_guidance(loaded.ckpt, 0.0)  # the null label's velocity is what log p(x) integrates
        labels = torch.full((len(pixels),), cfg.num_classes)
    result = image_bits_per_dim(model, pixels, labels, like.sampler(), like.divergence, like.probes, sample.seed,
                                sample.batch_size)
    print(f"N={result['n']} {source}: {result['bpd']:.4f} ± {result['bpd_se']:.4f} bits/dim "
          f"({'log p(x)' if marginal else 'log p(x | y)'}, {like.divergence} divergence"
          f"{f', {like.probes} probe(s)' if like.divergence == 'hutchinson' else ''}, {like.solver}"
          f"{f' tol {like.tolerance:g}' if like.solver == 'dopri5' else f' {like.steps} steps'}, NFE "
          f"{result['nfe']} per image, {result['seconds']:.0f} s)")
    return {**result, "source": source, "checkpoint": str(checkpoint), "weights": "ema" if use_ema else "raw",
            "marginal": marginal}


def sampled_metrics(args: argparse.Namespace, sample: SampleConfig) -> dict:
    """evaluate.py mnist | straightness | fid: sample the checkpoint (its recorded sampler unless told) and measure,
    printing one line."""
    weights, checkpoint, n = args.weights, args.checkpoint, args.n
    loaded = load_for_sampling(checkpoint, sample.solver, sample.steps, sample.guidance, sample.device,
                               weights == "ema")
    model, sampler = loaded.model, loaded.sampler
    if args.command == "straightness":
        result = {**straightness_of(model, n, sampler.guidance, sample.seed), "weights": weights,
                  "checkpoint": str(checkpoint)}
        print(f"N={n}  guidance {sampler.guidance}  straightness {result['straightness']:.4f} along "
              f"{result['reference_steps']}-step Euler paths; RMS distance of k-step samples from them: "
              + ", ".join(f"k={k}: {d:.4f}" for k, d in result["distance"].items()))
        return result
    if args.command == "fid" and (model.config.in_channels != 3 or loaded.record.dataset == "mnist"):
        raise ValueError(f"this checkpoint draws {model.config.in_channels}-channel "
                         f"{loaded.record.dataset or 'grey'} images: Inception FID against a folder of colour "
                         "photos would compare unlike things (use `evaluate.py mnist` for digits)")
    if args.command == "fid":
        print(f"FID: Inception features of {n} generated and {args.n_real or n} real images (and the floor's {n} other "
              "real ones where the folder holds them), ~8 images/s on 2 CPU cores (real ones cached after the first "
              "time)", flush=True)
        result = {**inception_fid(model, args.real_dir, n, sampler, sample.seed, sample.batch_size, args.n_real,
                                  args.stats_cache), "checkpoint": str(Path(checkpoint).resolve()), "weights": weights}
        floor = ("real-vs-real floor n/a (it needs --n-real = --n and a folder of 2N images)" if result["floor"] is None
                 else f"real-vs-real floor {result['floor']:.2f}  excess {result['excess']:.2f}")
        print(f"N={n} generated ({weights} weights, {sampler}, NFE {result['nfe']} per image, seed {sample.seed}) vs "
              f"{result['n_real']} real images of {args.real_dir}  Inception FID {result['fid']:.2f}  {floor}")
        return result
    real = load_mnist(args.data_root, train=False, download=False)
    check_reference_size(n, real.labels)  # before the reader: a bad --n needs none
    reader, accuracy = load_classifier(args.classifier, next(model.parameters()).device)
    result = {**mnist_quality(model, reader, real, n, sampler, sample.seed, sample.batch_size),
              "weights": weights, "classifier_accuracy": accuracy}
    print(f"N={result['n']}  solver {sampler.solver}  steps {sampler.steps}  NFE {result['nfe']} per image  "
          f"conditional accuracy {result['accuracy']:.2%}  Fréchet distance (MNIST-CNN features) "
          f"{result['frechet']:.3f}  real-vs-real floor {result['floor']:.3f}  excess {result['excess']:.3f}  "
          f"precision {result['precision']:.3f}  recall {result['recall']:.3f} (per class, k = 3)  "
          f"classifier accuracy {accuracy:.2%}")
    return result


# SampleConfig fields a command does not take: straightness follows Euler paths, likelihood has its own ODE
NOT_SAMPLED = {"straightness": ("solver", "steps", "batch_size"), "likelihood": ("solver", "steps", "guidance")}


def parser() -> argparse.ArgumentParser:
    """evaluate.py's flags: per command its inputs, SampleConfig's sampling flags and its own."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-classifier", help="train an MNIST CNN that the metrics read with (training set only)")
    t.add_argument("--data-root", default="data", help="folder holding MNIST/raw")
    t.add_argument("--arch", choices=CLASSIFIERS, default="cnn",
                   help=f"cnn: the metrics' default reader; bn-cnn: a second, independent one "
                        f"(--out {BN_CLASSIFIER_PATH})")
    t.add_argument("--epochs", type=int, default=None, help="default: 5 (cnn), 3 (bn-cnn)")
    t.add_argument("--out", default=None, help=f"default: {CLASSIFIER_PATH} (cnn), {BN_CLASSIFIER_PATH} (bn-cnn)")
    for name, helptext in (("mnist", "accuracy + Fréchet distance of a class-conditional MNIST checkpoint"),
                           ("fid", "Inception FID of an image-folder checkpoint against real images"),
                           ("straightness", "how straight a checkpoint's sampling paths are (reflow's measure)"),
                           ("likelihood", "bits/dim of held-out real images (change of variables)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--checkpoint", required=True, help="checkpoint or exported folder to measure")
        s.add_argument("--n", type=int, default=200 if name == "straightness" else 1000,
                       help="noise samples" if name == "straightness" else "generated (and real) images")
        add_weights_flag(s)
        s.add_argument("--json", default=None, help="also write the result here")
        add_flags(s, SampleConfig(), NOT_SAMPLED.get(name, ()))
    sub.choices["mnist"].add_argument("--data-root", default="data", help="folder holding MNIST/raw (real test digits)")
    sub.choices["mnist"].add_argument("--classifier", default=CLASSIFIER_PATH,
                                      help="the reader (evaluate.py train-classifier; default: %(default)s)")
    f = sub.choices["fid"]
    f.add_argument("--real-dir", required=True, help="folder of real images")
    f.add_argument("--n-real", type=int, default=None, help="real images, spread over the folder (default: --n)")
    f.add_argument("--stats-cache", default=None, help=f"folder of cached real statistics (default {STATS_DIR})")
    like = sub.choices["likelihood"]
    like.add_argument("--data-root", default=None, help="folder holding MNIST/raw: class-balanced random test digits")
    like.add_argument("--real-dir", default=None, help="or a folder of images (image-folder checkpoints)")
    add_flags(like, LikelihoodConfig())
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.command == "train-classifier":
        start, out = time.perf_counter(), args.out or CLASSIFIERS[args.arch][3]
        check_file_out(Path(out), "--out")
        epochs = CLASSIFIERS[args.arch][1] if args.epochs is None else args.epochs
        print(f"training the {args.arch} reader: {epochs} epochs over MNIST's 60,000 training digits (minutes on a "
              f"CPU) -> {out}", flush=True)
        accuracy = train_classifier(args.data_root, args.epochs, out=out, arch=args.arch)
        result = {"test_accuracy": accuracy, "seconds": time.perf_counter() - start, "path": out}
        print(f"classifier test accuracy {accuracy:.2%} ({result['seconds']:.0f} s) -> {out}")
        return result
    if not 1 <= args.n <= MAX_N:  # each image costs memory and minutes: a count nobody means is refused, not run
        raise ValueError(f"--n must lie in 1..{MAX_N:,}, got {args.n}")
    if getattr(args, "n_real", None) is not None and not 1 <= args.n_real <= MAX_N:
        raise ValueError(f"--n-real must lie in 1..{MAX_N:,}, got {args.n_real}")
    if args.json:
        check_file_out(Path(args.json), "--json")
    if getattr(args, "stats_cache", None):
        check_writable(Path(args.stats_cache), "--stats-cache")
    if args.command == "likelihood":
        config_from(args, LikelihoodConfig()).sampler()
    sample = config_from(args, SampleConfig(), NOT_SAMPLED.get(args.command, ()))
    sample.check()
    if args.command == "likelihood":
        result = checkpoint_likelihood(args.checkpoint, config_from(args, LikelihoodConfig()), sample, args.n,
                                       args.data_root, args.real_dir, args.weights == "ema")
    else:
        result = sampled_metrics(args, sample)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run(main)
