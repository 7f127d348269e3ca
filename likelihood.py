"""Exact log-likelihood of images under a flow, by the instantaneous change of variables (Chen et al. 2018):

    log p_1(x_1) = log N(x_0; 0, I) - ∫_0^1 div v(x_t, t) dt,

along the ODE path from the image x_1 (t = 1) back to its noise x_0 (t = 0), solved as one augmented ODE
for (x_t, ∫ div v). The divergence is exact (one backward pass per dimension: small images and tests) or
Hutchinson's unbiased estimate eps^T (∂v/∂x) eps with Rademacher probes eps held fixed along each path, so that
the integrand stays a smooth function of t for adaptive solvers (FFJORD, Grathwohl et al. 2019).

Bits per dimension of 8-bit data: pixel values k in {0..255} are dequantized to z = 2(k + u)/256 - 1 with
u ~ U(0, 1), so each value's bin is 2/256 wide in the model's [-1, 1], and bits/dim = -log2 p(z) / D + 7
(the usual variational bound, comparable with FFJORD's and Flow Matching's figures).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from progress import progress
from sampling import check_labels, check_request
from solvers import Sampler, Velocity, guided_velocity, solve

DIVERGENCES = ("exact", "hutchinson")
BINS = 256  # 8-bit pixels
EXACT_CHUNK = 64  # dimensions per batched backward pass of the exact divergence (memory grows with it)


@dataclass
class LikelihoodConfig:
    """How the log-likelihood is integrated."""

    solver: str = "dopri5"  # ODE solver of the augmented flow: an accurate one, since bits/dim depend on it
    steps: int = 32  # fixed-step solvers only
    tolerance: float = 1e-5  # dopri5 rtol = atol
    divergence: str = "hutchinson"  # exact (a backward pass per dimension: small images only) | hutchinson
    probes: int = 1  # Rademacher probes per image (hutchinson)
    marginal: bool = False  # log p(x) under the unconditional velocity (null label) instead of log p(x | y)

    def sampler(self) -> Sampler:
        """The ODE these settings integrate, unguided; ValueError naming the flag for a setting it cannot use."""
        if not 0 < self.tolerance <= 1 or not 1 <= self.steps <= 100_000:
            raise ValueError(f"--tolerance must lie in (0, 1] and --steps in 1..100000, got {self.tolerance}, "
                             f"{self.steps}")
        if self.divergence not in ("exact", "hutchinson") or not 1 <= self.probes <= 1000:
            raise ValueError(f"--divergence must be exact or hutchinson and --probes lie in 1..1000, got "
                             f"{self.divergence!r}, {self.probes}")
        return Sampler(self.solver, self.steps, 1.0, self.tolerance, self.tolerance)


ACCURATE = LikelihoodConfig().sampler()  # the default: dopri5 at tolerance 1e-5


def divergence(f, x: torch.Tensor, probes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) (B, ...) and its divergence (B,) at x (B, ...): exact when probes is None, else the mean over
    probes (K, B, ...) of eps^T (∂f/∂x) eps, one vector-Jacobian product per probe."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = f(x)
        if probes is not None:
            (vjp,) = torch.autograd.grad(out, x, probes.to(out.dtype), is_grads_batched=True)  # (K, B, ...)
            return out.detach(), (vjp * probes).flatten(2).sum(2).mean(0)
        flat, dims = out.flatten(1), x[0].numel()
        div = torch.zeros(len(x), dtype=out.dtype, device=x.device)
        for start in range(0, dims, EXACT_CHUNK):
            idx = torch.arange(start, min(start + EXACT_CHUNK, dims), device=x.device)
            basis = torch.zeros(len(idx), *flat.shape, dtype=out.dtype, device=x.device)  # e_i for every image
            basis[torch.arange(len(idx)), :, idx] = 1
            (rows,) = torch.autograd.grad(flat, x, basis, retain_graph=True, is_grads_batched=True)  # (c, B, ...)
            div += rows.flatten(2)[torch.arange(len(idx)), :, idx].sum(0)  # the diagonal entries ∂f_i/∂x_i
    return out.detach(), div.detach()


def rademacher(k: int, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """k probes (k, *shape) of independent ±1 entries, reproducible from seed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (k, *shape), generator=g) * 2 - 1).to(device, dtype)


def log_likelihood(v: Velocity, x: torch.Tensor, sampler: Sampler = ACCURATE, probes: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(log p(x) (B,) in nats, noise x_0 (B, ...), NFE) for points x (B, ...) at t = 1 under the flow dx/dt = v(t, x),
    integrated back to t = 0 with sampler's solver (its guidance is v's business).

    probes None takes the exact divergence, else Hutchinson's with these probes (K, B, ...). Runs in x's dtype,
    autocast off: the divergence sums D Jacobian entries, which bf16's 8-bit mantissa would bias.
    """
    shape, dims = x.shape, x[0].numel()

    def augmented(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        out, div = divergence(lambda z: v(t, z), state[:, :dims].view(shape), probes)
        return torch.cat([out.flatten(1), div[:, None]], dim=1)

    start = torch.cat([x.flatten(1), torch.zeros(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    with torch.autocast(x.device.type, enabled=False):
        end, nfe = solve(augmented, start, sampler.solver, sampler.steps, sampler.rtol, sampler.atol, span=(1.0, 0.0))
    noise, integral = end[:, :dims], end[:, dims]  # integral = ∫_1^0 div v dt = -∫_0^1 div v dt
    log_prior = -0.5 * (noise.square().sum(1) + dims * math.log(2 * math.pi))
    return log_prior + integral, noise.view(shape), nfe


def dequantize(pixels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """uint8 pixels (B, ...) -> points in [-1, 1] spread uniformly over each value's bin (float32)."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"dequantize takes 8-bit pixels (uint8), got {pixels.dtype}")
    u = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(seed))
    return (pixels.float() + u) * (2 / BINS) - 1


def bits_per_dim(log_p: torch.Tensor, dims: int) -> torch.Tensor:
    """Bits per dimension of 8-bit data from log p (nats) of its dequantized points in [-1, 1] with dims values."""
    return -log_p / (dims * math.log(2)) + math.log2(BINS / 2)


def image_bits_per_dim(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor | None = None,
                       sampler: Sampler = ACCURATE, divergence: str = "hutchinson", probes: int = 1, seed: int = 0,
                       batch_size: int = 100) -> dict:
    """Bits/dim (N,) of uint8 images (N, C, H, W) under a model's flow, conditional on labels (N,) where given
    (a label equal to num_classes, the null token, gives the unconditional log p(x)).

    Each batch is dequantized and gets its own Rademacher probes from seed; returns the per-image figures with
    their mean, standard error over images, NFE per image and seconds.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}: choose one of {', '.join(DIVERGENCES)}")
    if divergence == "hutchinson" and probes < 1:
        raise ValueError(f"hutchinson needs probes >= 1, got {probes}")
    check_request(len(pixels), batch_size)
    cfg = model.config
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or tuple(pixels.shape[1:]) != want:
        raise ValueError(f"likelihood takes 8-bit images (N, {', '.join(map(str, want))}) as uint8, got "
                         f"{pixels.dtype} {tuple(pixels.shape)}")
    check_labels(labels, cfg.num_classes, len(pixels), null_ok=True)
    device, start, bpd, nfes = next(model.parameters()).device, time.perf_counter(), [], []
    for i in progress(range(0, len(pixels), batch_size), "bits/dim"):
        x = dequantize(pixels[i:i + batch_size], seed + i).to(device)
        y = labels[i:i + batch_size].to(device) if labels is not None else None
        eps = rademacher(probes, tuple(x.shape), seed + i, device) if divergence == "hutchinson" else None
        log_p, _, nfe = log_likelihood(guided_velocity(model, y, sampler.guidance), x, sampler, eps)
        bpd.append(bits_per_dim(log_p, x[0].numel()).cpu())
        nfes.append(sampler.nfe(nfe, y is not None))
    bpd = torch.cat(bpd)
    return {"bpd": bpd.mean().item(), "bpd_se": (bpd.std() / len(bpd) ** 0.5).item() if len(bpd) > 1 else float("nan"),
            "per_image": bpd.tolist(), "nfe": round(sum(nfes) / len(nfes)), "seconds": time.perf_counter() - start,
            "n": len(bpd), **sampler.record(), "divergence": divergence,
            "probes": probes if divergence == "hutchinson" else 0,
            "conditional": labels is not None, "seed": seed}
