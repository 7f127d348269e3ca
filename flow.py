"""Rectified flow: the training objective and the guided velocity used for sampling.

Path: x_t = (1-t)·x0 + t·x1 with x0 ~ N(0, I) noise at t=0 and x1 data at t=1; target v = x1 - x0.
Guidance scale w: v = v_uncond + w·(v_cond - v_uncond); w = 1 is plain conditional sampling,
w = 0 unconditional, w > 1 pushes samples towards their class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from solvers import solve

T_SCHEDULES = ("uniform", "logit-normal")


def sample_t(n: int, schedule: str = "uniform", device: torch.device | str = "cpu", grid: int = 0) -> torch.Tensor:
    """Training times (n,) in [0, 1): uniform, logit-normal(0, 1) as in Stable Diffusion 3, or with grid = k
    the k Euler-step starts {0, 1/k, ..., (k-1)/k} (k-step distillation: the schedule is then ignored)."""
    if grid:
        return torch.randint(0, grid, (n,), device=device) / grid
    if schedule == "uniform":
        return torch.rand(n, device=device)
    if schedule == "logit-normal":
        return torch.sigmoid(torch.randn(n, device=device))
    raise ValueError(f"unknown t schedule {schedule!r}: choose one of {', '.join(T_SCHEDULES)}")


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1-t)·x0 + t·x1 for x0, x1: (B, ...) and t: (B,)."""
    t = t.view(-1, *([1] * (x1.dim() - 1)))
    return (1 - t) * x0 + t * x1


def drop_labels(y: torch.Tensor, p: float, null_class: int) -> torch.Tensor:
    """Replace each label by the null token with probability p (classifier-free guidance training)."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_class), y)


def flow_matching_loss(
    model: nn.Module,
    x1: torch.Tensor,
    y: torch.Tensor | None = None,
    num_classes: int | None = None,
    label_dropout: float = 0.1,
    t_schedule: str = "uniform",
    x0: torch.Tensor | None = None,
    t_grid: int = 0,
) -> torch.Tensor:
    """MSE between model(x_t, t, y) and x1 - x0 for data x1: (B, C, H, W) in [-1, 1].

    x0 is fresh noise, or the noise a reflow pair was drawn from (then x1 is that pair's image).
    """
    x0 = torch.randn_like(x1) if x0 is None else x0
    t = sample_t(x1.shape[0], t_schedule, x1.device, t_grid)
    if y is not None and label_dropout > 0:
        y = drop_labels(y, label_dropout, null_class=num_classes)
    v = model(interpolate(x0, x1, t), t, y)
    return F.mse_loss(v.float(), (x1 - x0).float())


def is_guided(y: torch.Tensor | None, guidance: float) -> bool:
    """Whether sampling runs the unconditional pass too: labels given and w != 1."""
    return y is not None and guidance != 1.0


def guided_velocity(model: nn.Module, y: torch.Tensor | None, guidance: float = 1.0):
    """v(t, x) for the solvers; with y and w != 1 the cond and uncond passes share one batched forward."""
    num_classes = model.config.num_classes
    if y is None and num_classes is not None:
        raise ValueError("this model is class-conditional: give labels")
    if y is None and guidance != 1.0:
        raise ValueError(f"guidance {guidance} needs a class-conditional model; this one is unconditional (use 1)")

    def v(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tb = t.expand(x.shape[0]).to(x.dtype)
        if not is_guided(y, guidance):
            return model(x, tb, y)
        null = torch.full_like(y, num_classes)
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null])).chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    return v


@torch.no_grad()
def generate(
    model: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    solver: str = "midpoint",
    steps: int = 10,
    guidance: float = 1.0,
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> tuple[torch.Tensor, int]:
    """Integrate noise (B, C, H, W) at t=0 to images at t=1 in [-1, 1]; returns (images, NFE).

    NFE counts network evaluations per image: a guided velocity is two (cond + uncond), though batched as one call.
    """
    x, calls = solve(guided_velocity(model, labels, guidance), noise, solver, steps, rtol, atol)
    return x.clamp(-1, 1), calls * (2 if is_guided(labels, guidance) else 1)
