"""The flow's ODE, from noise to images: the seeded noise, the solvers, the `Sampler` that picks one, and the model's
guided velocity integrated batch by batch (`flow_batches`, the one driver of sampling, inversion and reflow pairs).

Time convention (the whole repo): t=0 is noise, t=1 is data, x_t = (1-t)·x0 + t·x1, v = x1 - x0.
Every fixed-step solver takes the same arguments (velocity, x, t_grid) and integrates over the
grid; `solve` picks one by name and reports the number of velocity evaluations (NFE) it used.
Guidance scale w: v = v_uncond + w·(v_cond - v_uncond); w = 1 is plain conditional sampling,
w = 0 unconditional, w > 1 pushes samples towards their class.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
from torch import nn

from progress import progress

# (t: 0-dim tensor, x: (B, ...)[, t_end: 0-dim tensor]) -> (B, ...); t_end only for average velocities (meanflow)
Velocity = Callable[..., torch.Tensor]


def euler(v: Velocity, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """First order: x += h·v(t, x). 1 NFE per step."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * v(t, x)
    return x


def midpoint(v: Velocity, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Second order explicit midpoint rule. 2 NFE per step."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        x = x + h * v(t + h / 2, x + h / 2 * v(t, x))
    return x


def heun(v: Velocity, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Second order Heun (explicit trapezoid) rule. 2 NFE per step."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        k1 = v(t, x)
        k2 = v(t_next, x + h * k1)
        x = x + h / 2 * (k1 + k2)
    return x


def rk4(v: Velocity, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Classic fourth order Runge-Kutta. 4 NFE per step."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        k1 = v(t, x)
        k2 = v(t + h / 2, x + h / 2 * k1)
        k3 = v(t + h / 2, x + h / 2 * k2)
        k4 = v(t_next, x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def meanflow(u: Velocity, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Jumps along the average velocity over each step: x += h·u(t, x, t + h) (Geng et al. 2025, Eq. 12); exact for
    an exact average velocity, whatever the step. 1 NFE per step; needs a model trained with --objective meanflow."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * u(t, x, t_next)
    return x


FIXED_STEP = {"euler": euler, "midpoint": midpoint, "heun": heun, "rk4": rk4, "meanflow": meanflow}
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "meanflow": 1}  # velocity evaluations per fixed step
ADAPTIVE = ("dopri5",)  # handed to torchdiffeq
SOLVERS = tuple(FIXED_STEP) + ADAPTIVE
MAX_STEPS = 100_000  # steps a fixed-step solve may take: 50x the 2,000-step reference of docs/sampling.md
MAX_GUIDANCE = 100.0  # w past this only saturates the images
DOPRI5_CALLS_PER_STEP = 6  # dopri5's velocity calls per step (7 stages, the last reused): a plan's estimate


def check_solver(solver: str, steps: int) -> None:
    """Raise ValueError for an unknown solver name, or fewer than 1 step for a fixed-step solver."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if solver in FIXED_STEP and not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must lie in 1..{MAX_STEPS:,} for {solver}, got {steps}")


def solve(v: Velocity, x0: torch.Tensor, solver: str = "midpoint", steps: int = 10, rtol: float = 1e-3,
          atol: float = 1e-3, span: tuple[float, float] = (0.0, 1.0), states: bool = False) -> tuple[torch.Tensor, int]:
    """Integrate x0 at t = span[0] to t = span[1] with `solver`; returns (x at span[1], NFE). The default runs noise to
    data; span (1, 0) runs data back to noise, on the same grid reversed. `steps` is ignored by dopri5. states (fixed
    steps): return every grid point instead, (B, steps + 1, ...), x0 first: the same arithmetic, step by step."""
    check_solver(solver, steps)
    nfe = 0

    def counted(t: torch.Tensor, x: torch.Tensor, *t_end: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return v(t, x, *t_end)

    if solver in FIXED_STEP:
        ts = torch.linspace(*span, steps + 1, dtype=torch.float64).to(x0.device, x0.dtype)
        if not states:
            return FIXED_STEP[solver](counted, x0, ts), nfe
        path = [x0]
        for pair in ts.unfold(0, 2, 1):
            path.append(FIXED_STEP[solver](counted, path[-1], pair))
        return torch.stack(path, 1), nfe
    if states:
        raise ValueError("the states on a grid need a fixed-step solver (euler, midpoint, heun, rk4), not dopri5")

    from torchdiffeq import odeint  # imported here: only the adaptive path needs it

    times = torch.tensor(span, device=x0.device, dtype=x0.dtype)
    x1 = odeint(counted, x0, times, method=solver, rtol=rtol, atol=atol)[-1]
    return x1, nfe


@dataclass(frozen=True)
class Sampler:
    """How to draw: an ODE solver, its steps (ignored by dopri5), the guidance scale w (1 = none, 0 = unconditional)
    and dopri5's tolerances. Checked when made, so a Sampler in hand can run; checkpoints record one (`record`). The
    defaults are for a bare model or a checkpoint that records none (why: docs/sampling.md)."""

    solver: str = "midpoint"
    steps: int = 4  # midpoint: 2 NFE per step -> 8 network evaluations per image
    guidance: float = 1.0
    rtol: float = 1e-3
    atol: float = 1e-3

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise ValueError(f"steps must be a whole number, got {self.steps!r}")
        for name in ("guidance", "rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                what = " (1 = none, 0 = unconditional)" if name == "guidance" else ""
                raise ValueError(f"{name} must be a finite number{what}, got {value!r}")
        if not 0 <= self.guidance <= MAX_GUIDANCE or self.rtol <= 0 or self.atol <= 0:
            raise ValueError(f"guidance must lie in [0, {MAX_GUIDANCE}] (1 = none, 0 = unconditional) and the "
                             f"tolerances be > 0, got {self.guidance}, rtol {self.rtol}, atol {self.atol}")
        check_solver(self.solver, self.steps)

    @classmethod
    def recorded(cls, record: dict | None, solver: str | None = None, steps: int | None = None,
                 guidance: float | None = None) -> Sampler:
        """The caller's choices, else those a checkpoint records (its "sampler"), else the defaults."""
        names = {f.name for f in fields(cls)}
        chosen = {"solver": solver, "steps": steps, "guidance": guidance}
        stored = {k: v for k, v in (record or {}).items() if k in names and chosen.get(k) is None}
        if stored:
            try:
                cls(**stored)  # a bad record is the file's fault, not the caller's: said so
            except ValueError as e:
                raise ValueError(f"the checkpoint's recorded sampler {stored} is invalid ({e}): pass --solver, "
                                 "--steps and --guidance to sample it") from None
        return cls(**{**stored, **{k: v for k, v in chosen.items() if v is not None}})

    def __str__(self) -> str:
        tolerances = f" (rtol {self.rtol:g}, atol {self.atol:g})" if self.solver in ADAPTIVE else ""
        return f"{self.solver}, {self.steps} step(s){tolerances}, guidance w = {self.guidance:g}"

    def record(self) -> dict:
        """What a checkpoint keeps."""
        return asdict(self)

    def nfe(self, calls: int, conditional: bool) -> int:
        """The NFE rule: network evaluations per image of `calls` velocity calls; a guided call (a class-conditional
        draw at w != 1) runs the conditional and the unconditional pass (batched as one) and counts 2."""
        return calls * (2 if conditional and self.guidance != 1.0 else 1)

    def planned_nfe(self, conditional: bool) -> int:
        """NFE per image before drawing (dopri5's: an estimate)."""
        return self.nfe(self.steps * NFE_PER_STEP.get(self.solver, DOPRI5_CALLS_PER_STEP), conditional)


def noise_seed(seed: int, i: int) -> int:
    """Generator seed of sample i under `seed`. torch's CPU generator keeps 32 bits of a seed. Multiplying by 2^32 /
    golden ratio spreads nearby seeds far apart there: seeds within 1,000 of each other share none of their first 1.9
    million samples (with seed + i, seed 1 would redraw seed 0's samples shifted by one)."""
    return (seed * 0x9E3779B1 + i) % 2**32


def make_noise(n: int, shape: tuple[int, ...], seed: int, device: torch.device | str, start: int = 0) -> torch.Tensor:
    """Noise (n, *shape) for samples start .. start + n - 1; sample i depends only on (seed, i), not on the batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, i)))
                        for i in range(start, start + n)]).to(device)


def guided_velocity(model: nn.Module, y: torch.Tensor | None, guidance: float = 1.0) -> Velocity:
    """v(t, x) for the solvers; with y and w != 1 the cond and uncond passes share one batched forward."""
    num_classes = model.config.num_classes
    if y is None and num_classes is not None:
        raise ValueError("this model is class-conditional: give labels")
    if y is None and guidance != 1.0:
        raise ValueError(f"guidance {guidance} needs a class-conditional model; this one is unconditional (use 1)")

    def v(t: torch.Tensor, x: torch.Tensor, t_end: torch.Tensor | None = None) -> torch.Tensor:
        tb = t.expand(x.shape[0]).to(x.dtype)
        eb = t_end.expand(x.shape[0]).to(x.dtype) if t_end is not None else None  # meanflow: the jump's end
        if y is None or guidance == 1.0:
            return model(x, tb, y, eb) if eb is not None else model(x, tb, y)
        null = torch.full_like(y, num_classes)
        pair = (torch.cat([eb, eb]),) if eb is not None else ()
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null]), *pair).chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    return v


@torch.no_grad()
def integrate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, sampler: Sampler,
              backwards: bool = False, states: bool = False) -> tuple[torch.Tensor, int]:
    """The guided ODE: noise x (B, C, H, W) at t = 0 to images in [-1, 1] at t = 1, or with backwards images at t = 1
    to their noise at t = 0 (the same ODE run backwards, so one direction undoes the other up to both solvers'
    errors); returns (the result, NFE per image). states: the whole path on the solver's grid, (B, steps + 1, C, H,
    W), the image at its end."""
    if sampler.solver == "meanflow" and backwards:
        raise ValueError("solver meanflow jumps forwards only (average velocities were trained for t_end >= t): "
                         "invert with euler, midpoint, heun, rk4 or dopri5 (a meanflow model's u(x, t, t) is its "
                         "velocity)")
    if sampler.solver == "meanflow" and not getattr(model.config, "average_velocity", False):
        raise ValueError("solver meanflow jumps along average velocities: this model predicts the velocity only "
                         "(train with --objective meanflow, or sample with euler, midpoint, heun, rk4 or dopri5)")
    span = (1.0, 0.0) if backwards else (0.0, 1.0)
    x, calls = solve(guided_velocity(model, labels, sampler.guidance), x, sampler.solver, sampler.steps,
                     sampler.rtol, sampler.atol, span, states)
    if not backwards:
        x = torch.cat([x[:, :-1], x[:, -1:].clamp(-1, 1)], 1) if states else x.clamp(-1, 1)
    return x, sampler.nfe(calls, labels is not None)


@torch.no_grad()
def flow_batches(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, sampler: Sampler,
                 backwards: bool = False, batch_size: int = 256, states: bool = False) -> tuple[torch.Tensor, int]:
    """The one batched driver: noise x (N, C, H, W) to images in [-1, 1], or with backwards images to their noise
    (integrate), batch by batch on the model's device; returns (results on the CPU, NFE per image averaged over
    batches: adaptive dopri5 varies, fixed-step solvers do not); states: each path on the solver's grid."""
    device, out, nfes = next(model.parameters()).device, [], []
    for i in progress(range(0, len(x), batch_size), "inverting" if backwards else "sampling"):
        y = labels[i:i + batch_size].to(device) if labels is not None else None
        result, nfe = integrate(model, x[i:i + batch_size].to(device), y, sampler, backwards, states)
        out.append(result.cpu())
        nfes.append(nfe)
    return torch.cat(out), round(sum(nfes) / len(nfes))
