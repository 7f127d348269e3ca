"""Distribution matching for a one-step model: its jumps pulled toward the teacher flow's distribution as a whole.

Regression onto the teacher's paths (flow.grid_map_loss) learns each jump, and its errors show as grain. Distribution
matching (DMD: Yin et al. 2024, arXiv 2311.18828; DMD2: arXiv 2405.14867) adds a loss on where the jumps land as a
whole: a "fake" velocity network starts as the teacher and keeps learning the flow of the student's own jumps; noised
again to a time t, a jump is moved from where the fake network's clean image estimate puts it toward where the
teacher's puts it. Where the student's distribution equals the teacher's, both estimates agree and the term is zero.

Clean image estimate of a velocity v at x_t (t = 0 noise, t = 1 data): x̂ = x_t + (1 - t)·v(x_t, t).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from cli import changed_flags
from device import Runtime
from flow import interpolate
from sampling import load_for_sampling
from solvers import guided_velocity


@dataclass
class MatchConfig:
    """Distribution matching beside the paths' regression (`reflow.py distill --objective meanflow`)."""

    dm_weight: float = 0.0  # weight of the distribution-matching term beside the regression; 0 = regression alone
    dm_start: int = 0  # epochs of regression alone before the term joins (cheap steps that set the jumps' shape)
    dm_fake_lr: float = 2e-4  # Adam learning rate of the fake velocity network (betas 0, 0.99)
    dm_fake_steps: int = 2  # fake-network updates on the student's jumps per student step
    dm_t_min: float = 0.02  # the jumps are noised again to a time t ~ U(dm_t_min, dm_t_max) ...
    dm_t_max: float = 0.98  # ... where the teacher's and the fake's clean estimates are compared
    dm_teacher: str = ""  # the flow whose distribution the jumps match (default: the one the pairs were drawn from)

    def check(self) -> None:
        """ValueError for a setting that cannot train."""
        if not (0 <= self.dm_weight <= 100 and 0 < self.dm_fake_lr <= 1 and 1 <= self.dm_fake_steps <= 100
                and 0 <= self.dm_start <= 100_000):
            raise ValueError(f"--dm-weight must lie in [0, 100], --dm-fake-lr in (0, 1], --dm-fake-steps in 1..100 and "
                             f"--dm-start in 0..100000 (got {self.dm_weight}, {self.dm_fake_lr}, {self.dm_fake_steps}, "
                             f"{self.dm_start})")
        if not self.dm_weight and (changed := changed_flags(self)):
            raise ValueError(f"{changed[0]} shapes distribution matching: it needs --dm-weight > 0")
        if not 0 <= self.dm_t_min < self.dm_t_max <= 1:
            raise ValueError(f"--dm-t-min and --dm-t-max must satisfy 0 <= min < max <= 1 (got {self.dm_t_min}, "
                             f"{self.dm_t_max})")


def one_jump(net: nn.Module, noise: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The one-step model's image (B, C, H, W) from noise (B, C, H, W): x_1 = x_0 + u(x_0, 0, 1)."""
    t = torch.zeros(len(noise), device=noise.device, dtype=noise.dtype)
    return noise + net(noise, t, y, t + 1)


def clean_estimate(v: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂ = x_t + (1 - t)·v: where a velocity v (B, C, H, W) at x_t, t (B,) says the clean image is."""
    return xt + (1 - t).view(-1, 1, 1, 1) * v


def distribution_matching_loss(jump: torch.Tensor, real: nn.Module, fake: nn.Module, y: torch.Tensor | None,
                               t: torch.Tensor) -> torch.Tensor:
    """DMD's loss for the student's images jump (B, C, H, W), noised again to t (B,) with fresh noise: its gradient
    on jump is (x̂_fake - x̂_real) / mean|jump - x̂_real| per image (DMD's normalisation), divided by the element
    count, so a descent step moves each image from the fake's clean estimate toward the teacher's. real(x, t, y):
    the teacher's (guided) velocity; fake: the fake network."""
    with torch.no_grad():
        xt = interpolate(torch.randn_like(jump), jump, t)
        x_real = clean_estimate(real(xt, t, y).float(), xt, t)
        x_fake = clean_estimate(fake(xt, t, y).float(), xt, t)
        scale = (jump.float() - x_real).abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-4)
        target = jump.float() - (x_fake - x_real) / scale
    return 0.5 * F.mse_loss(jump.float(), target)


class Critic:
    """What distribution matching trains beside the student: the frozen teacher (its guided velocity is the real
    side) and the fake velocity network with its optimizer, which follows the student's jumps. Training-time only:
    a checkpoint keeps the fake network and its optimizer for an exact resume; an export drops them."""

    def __init__(self, teacher: nn.Module, guidance: float, cfg: MatchConfig, wrap=lambda m: m):
        """teacher: the flow on the run's device (eval mode, frozen); wrap: how the run calls a trained module (DDP)."""
        self.teacher, self.guidance, self.cfg = teacher.requires_grad_(False).eval(), guidance, cfg
        self.fake = copy.deepcopy(teacher).requires_grad_(True).train()  # starts as the teacher
        self.fake_net = wrap(self.fake)
        self.optimizer = torch.optim.Adam(self.fake.parameters(), lr=cfg.dm_fake_lr, betas=(0.0, 0.99))
        self.start = 0  # the first step with the term: dm_start epochs in (the run sets it)

    def real(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The teacher's velocity at its recorded guidance."""
        return guided_velocity(self.teacher, y, self.guidance if y is not None else 1.0)(t, x)

    def loss(self, jump: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The distribution-matching term for the student's jumps (B, C, H, W), at fresh times in [t_min, t_max]."""
        t = self.cfg.dm_t_min + (self.cfg.dm_t_max - self.cfg.dm_t_min) * torch.rand(len(jump), device=jump.device)
        return distribution_matching_loss(jump, self.real, self.fake_net, y, t.to(jump.dtype))

    def follow(self, jump: torch.Tensor, y: torch.Tensor | None, autocast) -> None:
        """dm_fake_steps flow-matching updates of the fake network on the student's jumps (detached)."""
        jump = jump.detach()
        for _ in range(self.cfg.dm_fake_steps):
            with autocast():
                x0 = torch.randn_like(jump)
                t = torch.rand(len(jump), device=jump.device).to(jump.dtype)
                loss = F.mse_loss(self.fake_net(interpolate(x0, jump, t), t, y).float(), (jump - x0).float())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

    def state_dict(self) -> dict:
        return {"fake": self.fake.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.fake.load_state_dict(state["fake"])
        self.optimizer.load_state_dict(state["optimizer"])


def critic_for(cfg: MatchConfig, student: nn.Module, rt: Runtime) -> Critic:
    """The run's critic: its teacher (cfg.dm_teacher at its recorded guidance, frozen, on rt's device) and fake net."""
    loaded = load_for_sampling(cfg.dm_teacher, device=rt.device)
    if loaded.model.config.average_velocity or replace(loaded.model.config, average_velocity=True) != student.config:
        raise ValueError(f"--dm-teacher {cfg.dm_teacher} holds another model than the student (the teacher must be "
                         "the flow the student was converted from)")
    return Critic(loaded.model.to(memory_format=rt.memory_format), loaded.sampler.guidance, cfg, rt.distributed)
