import math

import pytest
import torch

from solvers import FIXED_STEP, SOLVERS, guided_velocity, solve

NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "meanflow": 1}


@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_on_polynomial_fields(solver):
    x0 = torch.zeros(3, dtype=torch.float64)
    # dx/dt = 3t^2 integrates to exactly 1; dx/dt = const to exactly const (every method is exact here
    # except Euler on the quadratic, which is checked separately below).
    x1, _ = solve(lambda t, x, *t_end: torch.full_like(x, 2.5), x0, solver, steps=3)
    assert torch.allclose(x1, torch.full_like(x0, 2.5), atol=1e-12)
    if solver not in ("euler", "meanflow"):  # (meanflow on a velocity is Euler; its own test is below)
        x1, _ = solve(lambda t, x: 2 * t * torch.ones_like(x), x0, solver, steps=3, rtol=1e-10, atol=1e-10)
        assert torch.allclose(x1, torch.ones_like(x0), atol=1e-9)
    if solver in ("rk4", "dopri5"):
        x1, _ = solve(lambda t, x: 3 * t**2 * torch.ones_like(x), x0, solver, steps=2, rtol=1e-10, atol=1e-10)
        assert torch.allclose(x1, torch.ones_like(x0), atol=1e-9)


@pytest.mark.parametrize("solver", ["midpoint", "heun", "rk4", "dopri5"])
def test_backwards_span_runs_the_same_ode_in_reverse(solver):
    # from t=1 back to t=0, dx/dt = 2t gives x(0) = x(1) - 1 exactly; dx/dt = -x^2 + cos(t)x returns to its start
    x1, nfe = solve(lambda t, x: 2 * t * torch.ones_like(x), torch.ones(2, dtype=torch.float64), solver, steps=4,
                    rtol=1e-10, atol=1e-10, span=(1.0, 0.0))
    assert torch.allclose(x1, torch.zeros(2, dtype=torch.float64), atol=1e-9) and nfe > 0
    f = lambda t, x: -x**2 + torch.cos(t) * x  # noqa: E731
    x0 = torch.tensor([0.7, -0.3], dtype=torch.float64)
    there, _ = solve(f, x0, solver, steps=256, rtol=1e-10, atol=1e-10)
    back, _ = solve(f, there, solver, steps=256, rtol=1e-10, atol=1e-10, span=(1.0, 0.0))
    assert torch.allclose(back, x0, atol=1e-7)


def test_euler_on_linear_time_field_by_hand():
    # Left Riemann sum of 2t over 4 steps: 2 * (0 + 1/4 + 2/4 + 3/4) / 4 = 0.75
    x1, nfe = solve(lambda t, x: 2 * t * torch.ones_like(x), torch.zeros(1, dtype=torch.float64), "euler", steps=4)
    assert x1.item() == pytest.approx(0.75, abs=1e-12) and nfe == 4


@pytest.mark.parametrize("steps", [1, 3])
def test_meanflow_jumps_are_exact_with_the_exact_average_velocity(steps):
    """dx/dt = 3t^2 averages (t_end^3 - t^3) / (t_end - t) over a step: any number of jumps lands on 1."""
    u = lambda t, x, t_end: (t_end**3 - t**3) / (t_end - t) * torch.ones_like(x)  # noqa: E731
    x1, nfe = solve(u, torch.zeros(2, dtype=torch.float64), "meanflow", steps=steps)
    assert torch.allclose(x1, torch.ones(2, dtype=torch.float64), atol=1e-12) and nfe == steps


def exact_error(solver: str, steps: int) -> float:
    """Error on dx/dt = -x^2 + cos(t) x, a smooth nonlinear ODE, against dopri5 at tight tolerance."""
    f = lambda t, x: -x**2 + torch.cos(t) * x
    x0 = torch.tensor([0.7, -0.3, 1.2], dtype=torch.float64)
    ref, _ = solve(f, x0, "dopri5", rtol=1e-12, atol=1e-12)
    x1, _ = solve(f, x0, solver, steps=steps)
    return (x1 - ref).abs().max().item()


@pytest.mark.parametrize("solver,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_order_of_accuracy(solver, order):
    ratio = exact_error(solver, 16) / exact_error(solver, 32)
    assert ratio == pytest.approx(2**order, rel=0.15)


@pytest.mark.parametrize("solver", FIXED_STEP)
@pytest.mark.parametrize("steps", [1, 7])
def test_nfe_counts(solver, steps):
    _, nfe = solve(lambda t, x, *t_end: x, torch.ones(2), solver, steps=steps)
    assert nfe == NFE_PER_STEP[solver] * steps


def test_dopri5_reports_its_evaluations():
    calls = 0

    def f(t, x):
        nonlocal calls
        calls += 1
        return -x

    x1, nfe = solve(f, torch.ones(1, dtype=torch.float64), "dopri5", rtol=1e-8, atol=1e-8)
    assert nfe == calls > 6
    assert x1.item() == pytest.approx(math.exp(-1), rel=1e-6)


def test_bad_solver_and_steps():
    with pytest.raises(ValueError, match="unknown solver 'rk5'"):
        solve(lambda t, x: x, torch.ones(1), "rk5")
    with pytest.raises(ValueError, match="steps must lie in 1..100,000 for euler"):
        solve(lambda t, x: x, torch.ones(1), "euler", steps=0)
    _, nfe = solve(lambda t, x: -x, torch.ones(1), "dopri5", steps=0)  # adaptive: steps plays no part
    assert nfe > 0


class Linear(torch.nn.Module):
    """A 'model' whose velocity is known: x + t + 10·y."""

    class config:
        num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        return x + t.view(-1, 1) + 10 * y.view(-1, 1).float()


def test_guidance_convention():
    model, x, t, y = Linear(), torch.zeros(2, 1), torch.tensor(0.5), torch.tensor([1, 2])
    cond = guided_velocity(model, y, 1.0)(t, x)
    assert torch.equal(cond, torch.tensor([[10.5], [20.5]]))  # w = 1 is the plain conditional velocity
    assert model.calls == [2]
    w = 3.0
    guided = guided_velocity(model, y, w)(t, x)
    v_uncond = 0.5 + 10 * 3  # null token = num_classes = 3
    assert torch.allclose(guided, v_uncond + w * (cond - v_uncond))
    assert model.calls == [2, 4]  # cond and uncond in one batched forward


def test_guidance_zero_is_the_null_label_velocity():
    model, x, t, y = Linear(), torch.zeros(2, 1), torch.tensor(0.5), torch.tensor([1, 2])
    null = torch.full_like(y, Linear.config.num_classes)
    assert torch.equal(guided_velocity(model, y, 0.0)(t, x), model(x, t.expand(2), null))
