"""ODE solvers for dx/dt = v(t, x) from t=0 (noise) to t=1 (data), or back (inversion, likelihood).

Time convention (the whole repo): t=0 is noise, t=1 is data, x_t = (1-t)·x0 + t·x1, v = x1 - x0.
Every fixed-step solver takes the same arguments (velocity, x, t_grid) and integrates over the
grid; `solve` picks one by name and reports the number of velocity evaluations (NFE) it used.
"""
from __future__ import annotations

from typing import Callable

import torch

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


def check_solver(solver: str, steps: int) -> None:
    """Raise ValueError for an unknown solver name, or fewer than 1 step for a fixed-step solver."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if solver in FIXED_STEP and steps < 1:
        raise ValueError(f"steps must be >= 1 for {solver}, got {steps}")


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
