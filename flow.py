"""Rectified flow: the training objective and the guided velocity used for sampling.

Path: x_t = (1-t)·x0 + t·x1 with x0 ~ N(0, I) noise at t=0 and x1 data at t=1; target v = x1 - x0.
Guidance scale w: v = v_uncond + w·(v_cond - v_uncond); w = 1 is plain conditional sampling,
w = 0 unconditional, w > 1 pushes samples towards their class.

MeanFlow (Geng et al. 2025, arXiv 2505.13447) trains the average velocity u(x_t, t, t_end) =
1/(t_end - t)·∫_t^t_end v(x_s, s) ds instead, so that one jump x_1 = x_0 + u(x_0, 0, 1) samples.
The paper runs time from data (0) to noise (1); in this repo's direction its identity (Eq. 6) reads
u(x_t, t, t_end) = v(x_t, t) + (t_end - t)·d/dt u(x_t, t, t_end), with the total derivative
d/dt u = v·∂_x u + ∂_t u along the path (t_end held fixed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from solvers import solve

T_SCHEDULES = ("uniform", "logit-normal")
OBJECTIVES = ("flow-matching", "meanflow")
MF_TANGENTS = ("conditional", "predicted")  # meanflow: the direction of the total derivative (mean_flow_loss)
MF_DERIVATIVES = ("difference", "jvp")  # meanflow: how the total derivative is taken
ADAPTIVE_WEIGHT_EPS = 1e-3  # c in the adaptive loss weight 1 / (||Δ||² + c)^p (the paper's value)
# α-Flow's sigmoid curriculum (Zhang et al. 2025, arXiv 2510.20771; their released configs): steepness 25, and α
# snaps to 0 (MeanFlow) below 0.005 and to 1 (flow matching) above 0.995
ALPHA_STEEPNESS, ALPHA_SNAP = 25.0, 0.005


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


def mean_flow_times(n: int, share: float, mu: float, sigma: float, device: torch.device | str = "cpu",
                    end_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, t_end), each (n,): two logit-normal(mu, sigma) times sorted, t <= t_end, for the first k = round(share·n)
    items; t_end = t for the rest (there the loss is plain flow matching). The first round(end_share·k) of those
    end at the data instead, t_end = 1: the intervals that the one-jump sampler's (0, 1) belongs to, which two
    sorted draws almost never give. Fixed counts keep shapes fixed."""
    times = torch.sigmoid(mu + sigma * torch.randn(2, n, device=device))
    t, t_end = times.min(0).values, times.max(0).values
    k = round(share * n)
    j = round(end_share * k)
    return t, torch.cat([torch.ones_like(t[:j]), t_end[j:k], t[k:]])


def curriculum_alpha(progress: float, span: float) -> float:
    """α at a training progress in [0, 1] (step / last step): 1 at the start, down a sigmoid centred at span / 2 to 0
    (exactly 0 from ~0.71·span on); span 0 gives 0 throughout, plain MeanFlow."""
    if span <= 0:
        return 0.0
    alpha = 1 - 1 / (1 + math.exp(-ALPHA_STEEPNESS * (progress / span - 0.5)))
    return 0.0 if alpha < ALPHA_SNAP else 1.0 if alpha > 1 - ALPHA_SNAP else alpha


def total_derivative(model: nn.Module, x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor, y: torch.Tensor | None,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du/dt) at x (B, C, H, W), t, t_end (B,): u = model(x, t, y, t_end) and its derivative along dx/dt = v with
    t_end fixed, d/dt u = v·∂_x u + ∂_t u, by one forward-mode JVP with tangent (v, 1) in (x, t)."""
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels (CPU flash, CUDA) have no forward-mode AD
        return torch.func.jvp(lambda x, t: model(x, t, y, t_end), (x, t), (v, torch.ones_like(t)))


def difference_derivative(model: nn.Module, x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor,
                          y: torch.Tensor | None, v: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    """du/dt as total_derivative's, (B, C, H, W), by a central difference along (v, 1) in one fp32 pass of 2B items.

    Its error is O(h²) plus fp32 rounding / h: on the trained MNIST U-Net 10% at h = 1e-3 and 0.1% at h = 1e-4,
    where rounding takes over. It costs two forward passes, against the JVP's ~6 on a CPU."""
    y2 = torch.cat([y, y]) if y is not None else None
    up, down = model(torch.cat([x + h * v, x - h * v]), torch.cat([t + h, t - h]), y2, torch.cat([t_end, t_end])).chunk(2)
    return (up - down) / (2 * h)


@torch.no_grad()
def interval_target(plain: nn.Module, x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor, y: torch.Tensor | None,
                    v: torch.Tensor, tangent: str = "conditional", derivative: str = "difference", alpha: float = 0.0
                    ) -> torch.Tensor:
    """Target (B, C, H, W) of u(x, t, t_end), in v's dtype, for x on the path at t < t_end (B,) with velocity v (B, C, H, W).

    alpha 0: MeanFlow's v + (t_end - t)·du/dt (mean_flow_loss says how du/dt is taken). alpha in (0, 1]: α-Flow's
    α·v + (1 - α)·u(x_s, s, t_end) at s = t + α·(t_end - t), x_s = x + α·(t_end - t)·v (Zhang et al. 2025,
    arXiv 2510.20771): a step of α of the interval along v, then the model's own average velocity over the rest,
    one forward under the caller's autocast. For small α it is u + α·(MeanFlow's target - u) + O(α²)."""
    if alpha > 0:
        step = alpha * (t_end - t)
        rest = plain(x + step.view(-1, 1, 1, 1) * v, t + step, y, t_end).float() if alpha < 1 else 0
        return alpha * v + (1 - alpha) * rest
    direction = v if tangent == "conditional" else plain(x, t, y, t).float()
    with torch.autocast(x.device.type, enabled=False):  # forward-mode AD refuses autocast's mixed dtypes
        args = (plain, x.float(), t, t_end, y, direction)
        du_dt = total_derivative(*args)[1] if derivative == "jvp" else difference_derivative(*args)
    return v + (t_end - t).view(-1, 1, 1, 1) * du_dt.float()


def mean_flow_loss(
    net: nn.Module,
    x1: torch.Tensor,
    y: torch.Tensor | None = None,
    num_classes: int | None = None,
    label_dropout: float = 0.1,
    x0: torch.Tensor | None = None,
    plain: nn.Module | None = None,
    share: float = 0.25,
    mu: float = -0.4,
    sigma: float = 1.0,
    weight_power: float = 1.0,
    guidance: float = 1.0,
    tangent: str = "conditional",
    derivative: str = "difference",
    end_share: float = 0.0,
    alpha: float = 0.0,
) -> torch.Tensor:
    """MeanFlow loss (Geng et al. 2025, Eq. 9 and 10) for data x1: (B, C, H, W) in [-1, 1]:
    ||u(x_t, t, t_end) - sg(v + (t_end - t)·du/dt)||², weighted by sg(1 / (||Δ||² + c)^p) per image (p = 0: MSE).

    The total derivative du/dt runs without autograd on plain (the unwrapped module: torch.func cannot go through
    DDP or compile wrappers, and the target is stop-gradient anyway), in fp32, for the items with t_end > t only:
    derivative "jvp" is one forward-mode JVP with tangent (v, 1) in (x, t), "difference" a central difference
    (difference_derivative). tangent "conditional" moves x along the straight path's v = x1 - x0 (the paper);
    "predicted" along the model's own velocity u(x_t, t, t), as improved MeanFlow does (Geng et al. 2025b,
    arXiv 2512.02012, Sec. 4.1): the same field in expectation, without the pair's noise. net (the wrapped model,
    under the caller's autocast) gives the prediction that gradients flow through. guidance w != 1 folds
    classifier-free guidance into the target (the paper's Eq. 13-14): v becomes w·v + (1 - w)·u(x_t, t, t | no
    label) for the items that kept their label, so one network evaluation samples guided. mu, sigma: logit-normal
    times in this repo's direction (the paper's lognorm(-0.4, 1.0) is mu = 0.4 here; -0.4, nearer the noise, measured
    better on MNIST). end_share: the share of the t_end > t items that end at the data, t_end = 1 (mean_flow_times).

    alpha in (0, 1] swaps the derivative for α-Flow's finite step (interval_target), and those items' weight is
    multiplied by α, as α-Flow's released code does: the error shrinks like α, so under the adaptive weight (p = 1)
    the gradient stays at MeanFlow's scale. α = 1 trains every interval on v (trajectory flow matching); α -> 0 is
    MeanFlow; curriculum_alpha anneals from one to the other.
    """
    if tangent not in MF_TANGENTS or derivative not in MF_DERIVATIVES:
        raise ValueError(f"unknown meanflow tangent {tangent!r} or derivative {derivative!r}: choose a tangent from "
                         f"{', '.join(MF_TANGENTS)} and a derivative from {', '.join(MF_DERIVATIVES)}")
    plain = net if plain is None else plain
    x0 = torch.randn_like(x1) if x0 is None else x0
    t, t_end = mean_flow_times(x1.shape[0], share, mu, sigma, x1.device, end_share)
    if y is not None and label_dropout > 0:
        y = drop_labels(y, label_dropout, null_class=num_classes)
    xt = interpolate(x0, x1, t)
    v = (x1 - x0).float()
    k = round(share * x1.shape[0])  # the items with t_end > t come first (mean_flow_times)
    yk = y[:k] if y is not None else None
    with torch.no_grad():  # the target: velocities under the caller's autocast, the derivative in fp32
        if guidance != 1.0 and y is not None:
            kept = (y != num_classes).view(-1, 1, 1, 1)
            v_uncond = plain(xt, t, torch.full_like(y, num_classes)).float()
            v = torch.where(kept, guidance * v + (1 - guidance) * v_uncond, v)
        target = v.clone()
        if k:
            target[:k] = interval_target(plain, xt[:k], t[:k], t_end[:k], yk, v[:k], tangent, derivative, alpha)
    error = (net(xt, t, y, t_end).float() - target).square().flatten(1).mean(1)  # per image
    weight = 1 / (error.detach() + ADAPTIVE_WEIGHT_EPS) ** weight_power
    if alpha > 0:
        weight[:k] *= alpha
    return (weight * error).mean()


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

    def v(t: torch.Tensor, x: torch.Tensor, t_end: torch.Tensor | None = None) -> torch.Tensor:
        tb = t.expand(x.shape[0]).to(x.dtype)
        eb = t_end.expand(x.shape[0]).to(x.dtype) if t_end is not None else None  # meanflow: the jump's end
        if not is_guided(y, guidance):
            return model(x, tb, y, eb) if eb is not None else model(x, tb, y)
        null = torch.full_like(y, num_classes)
        pair = (torch.cat([eb, eb]),) if eb is not None else ()
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null]), *pair).chunk(2)
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
    if solver == "meanflow" and not getattr(model.config, "average_velocity", False):
        raise ValueError("solver meanflow jumps along average velocities: this model predicts the velocity only "
                         "(train with --objective meanflow, or sample with euler, midpoint, heun, rk4 or dopri5)")
    x, nfe = integrate(model, noise, labels, solver, steps, guidance, rtol, atol)
    return x.clamp(-1, 1), nfe


@torch.no_grad()
def invert(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    solver: str = "midpoint",
    steps: int = 10,
    guidance: float = 1.0,
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> tuple[torch.Tensor, int]:
    """Integrate images (B, C, H, W) in [-1, 1] at t=1 back to their noise at t=0; returns (noise, NFE).

    The ODE that generate solves, run backwards: generate(invert(x)) returns x up to both solvers' errors.
    """
    if solver == "meanflow":
        raise ValueError("solver meanflow jumps forwards only (average velocities were trained for t_end >= t): "
                         "invert with euler, midpoint, heun, rk4 or dopri5 (a meanflow model's u(x, t, t) is its "
                         "velocity)")
    return integrate(model, images, labels, solver, steps, guidance, rtol, atol, span=(1.0, 0.0))


def integrate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, solver: str, steps: int,
              guidance: float, rtol: float, atol: float, span: tuple[float, float] = (0.0, 1.0)
              ) -> tuple[torch.Tensor, int]:
    """The guided ODE from span[0] to span[1] for x (B, C, H, W); returns (x at span[1], NFE per image): a guided
    velocity counts two (cond + uncond), though batched as one call."""
    x, calls = solve(guided_velocity(model, labels, guidance), x, solver, steps, rtol, atol, span)
    return x, calls * (2 if is_guided(labels, guidance) else 1)
