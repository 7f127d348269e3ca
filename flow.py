"""The training objectives: rectified flow matching, MeanFlow's average velocity, and flow-map distillation on a
sampler's grid; label dropout, which teaches the null label that guidance needs; the validation loss.

Path: x_t = (1-t)·x0 + t·x1 with x0 ~ N(0, I) noise at t=0 and x1 data at t=1; target v = x1 - x0.

MeanFlow (Geng et al. 2025, arXiv 2505.13447) trains the average velocity u(x_t, t, t_end) =
1/(t_end - t)·∫_t^t_end v(x_s, s) ds instead, so that one jump x_1 = x_0 + u(x_0, 0, 1) samples.
The paper runs time from data (0) to noise (1); in this repo's direction its identity (Eq. 6) reads
u(x_t, t, t_end) = v(x_t, t) + (t_end - t)·d/dt u(x_t, t, t_end), with the total derivative
d/dt u = v·∂_x u + ∂_t u along the path (t_end held fixed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.utils.data import Dataset, default_collate

from device import Runtime
from solvers import make_noise

T_SCHEDULES = ("uniform", "logit-normal")
OBJECTIVES = ("flow-matching", "meanflow")
COUPLINGS = ("independent", "ot")  # how each image gets its noise (--coupling)
FOLDED_GUIDANCE = 1.5  # meanflow's default folded guidance where the model learns the null label (docs/meanflow.md)
ADAPTIVE_WEIGHT_EPS = 1e-3  # c in the adaptive loss weight 1 / (||Δ||² + c)^p (the paper's value)
# α-Flow's sigmoid curriculum (Zhang et al. 2025, arXiv 2510.20771; their released configs): steepness 25, and α
# snaps to 0 (MeanFlow) below 0.005 and to 1 (flow matching) above 0.995
ALPHA_STEEPNESS, ALPHA_SNAP = 25.0, 0.005


def sample_t(n: int, schedule: str = "uniform", device: torch.device | str = "cpu", grid: int = 0,
             mu: float = 0.0) -> torch.Tensor:
    """Training times (n,) in [0, 1): uniform, logit-normal(mu, 1) (Stable Diffusion 3's mu = 0; mu < 0 puts more
    of them near the noise end t = 0), or with grid = k the k Euler-step starts {0, 1/k, ..., (k-1)/k} (k-step
    distillation: the schedule is then ignored)."""
    if grid:
        return torch.randint(0, grid, (n,), device=device) / grid
    if schedule == "uniform":
        return torch.rand(n, device=device)
    if schedule == "logit-normal":
        return torch.sigmoid(mu + torch.randn(n, device=device))
    raise ValueError(f"unknown t schedule {schedule!r}: choose one of {', '.join(T_SCHEDULES)}")


def ot_noise(x1: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Fresh noise (B, C, H, W) paired with the images x1 by minibatch optimal transport (least total squared
    distance; Tong et al. 2023, OT-CFM), within each class of y so that the noise given a class stays N(0, I)."""
    x0 = torch.randn_like(x1)
    cost = torch.cdist(x0.flatten(1).float(), x1.flatten(1).float()).square().cpu()  # (B, B): one transfer a step
    labels = torch.zeros(len(x1), dtype=torch.long) if y is None else y.cpu()
    source = torch.empty(len(x1), dtype=torch.long)  # image j takes noise source[j]
    for c in labels.unique():
        index = (labels == c).nonzero()[:, 0]
        noise, image = linear_sum_assignment(cost[index][:, index].numpy())
        source[index[image]] = index[noise]
    return x0[source.to(x1.device)]


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1-t)·x0 + t·x1 for x0, x1: (B, ...) and t: (B,)."""
    t = t.view(-1, *([1] * (x1.dim() - 1)))
    return (1 - t) * x0 + t * x1


def can_guide(num_classes: int | None, label_dropout: float | None) -> bool:
    """Whether training teaches the null label that guidance needs: classes and label dropout (None, unknown
    in checkpoints older than the field, is assumed)."""
    return num_classes is not None and (label_dropout is None or label_dropout > 0)


def drop_labels(y: torch.Tensor, p: float, null_class: int) -> torch.Tensor:
    """Replace each label by the null token with probability p (classifier-free guidance training)."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_class), y)


def flow_matching_loss(model: nn.Module, x1: torch.Tensor, y: torch.Tensor | None = None,
                       num_classes: int | None = None, label_dropout: float = 0.1, x0: torch.Tensor | None = None,
                       t: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between model(x_t, t, y) and x1 - x0 for data x1: (B, C, H, W) in [-1, 1]. x0 is fresh noise, or the noise a
    reflow pair was drawn from (then x1 is that pair's image); t (B,) the training times (sample_t), uniform if None."""
    x0 = torch.randn_like(x1) if x0 is None else x0
    t = sample_t(x1.shape[0], device=x1.device) if t is None else t
    if y is not None and label_dropout > 0:
        y = drop_labels(y, label_dropout, null_class=num_classes)
    v = model(interpolate(x0, x1, t), t, y)
    return F.mse_loss(v.float(), (x1 - x0).float())


@dataclass
class MeanFlowConfig:
    """MeanFlow (--objective meanflow): how intervals are drawn and trained."""

    mf_share: float = 0.25  # share of each batch with t_end > t; the rest trains u(x, t, t) = v as flow matching
    mf_mu: float = -0.4  # logit-normal mean of the two times (the paper's lognorm(-0.4, 1) is +0.4 in this direction)
    mf_sigma: float = 1.0  # logit-normal standard deviation of the two times
    mf_weight_power: float = 1.0  # adaptive loss weight 1 / (||error||^2 + 1e-3)^p per image; 0 = plain MSE
    mf_guidance: float | None = None  # guidance w folded in (default: 1.5 with classes and label dropout, else 1)
    mf_curriculum: float = 1.0  # share of training over which α-Flow's curriculum anneals flow matching into MeanFlow

    def resolved(self, can_guide: bool) -> MeanFlowConfig:
        """This config checked (ValueError for a setting that cannot train), its folded guidance resolved: as given,
        else 1.5 where the model learns the null label (can_guide; the docs' runs), else 1."""
        for name in ("mf_share", "mf_curriculum"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(self, name)}")
        if not (0 < self.mf_sigma <= 10 and 0 <= self.mf_weight_power <= 10 and 0 <= (self.mf_guidance or 0) <= 100
                and -10 <= self.mf_mu <= 10):
            raise ValueError(f"--mf-sigma must be > 0, --mf-weight-power and --mf-guidance >= 0 (got {self.mf_sigma}, "
                             f"{self.mf_weight_power}, {self.mf_guidance}); at most 10, 10 and 100; --mf-mu in "
                             f"[-10, 10] (got {self.mf_mu})")
        if self.mf_guidance not in (None, 1) and not can_guide:
            raise ValueError(f"--mf-guidance {self.mf_guidance} folds classifier-free guidance into training: it "
                             "needs classes and --label-dropout > 0 (the unconditional velocity it guides against)")
        folded = (FOLDED_GUIDANCE if can_guide else 1.0) if self.mf_guidance is None else self.mf_guidance
        return replace(self, mf_guidance=folded)


def mean_flow_times(n: int, share: float, mu: float, sigma: float, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, t_end), each (n,): two logit-normal(mu, sigma) times sorted, t <= t_end, for the first k = round(share·n)
    items; t_end = t for the rest (there the loss is plain flow matching). Fixed counts keep shapes fixed."""
    times = torch.sigmoid(mu + sigma * torch.randn(2, n, device=device))
    t, t_end = times.min(0).values, times.max(0).values
    k = round(share * n)
    return t, torch.cat([t_end[:k], t[k:]])


def curriculum_alpha(progress: float, span: float) -> float:
    """α at a training progress in [0, 1] (step / last step): 1 at the start, down a sigmoid centred at span / 2 to 0
    (exactly 0 from ~0.71·span on); span 0 gives 0 throughout, plain MeanFlow."""
    if span <= 0:
        return 0.0
    alpha = 1 - 1 / (1 + math.exp(-ALPHA_STEEPNESS * (progress / span - 0.5)))
    return 0.0 if alpha < ALPHA_SNAP else 1.0 if alpha > 1 - ALPHA_SNAP else alpha


def difference_derivative(model: nn.Module, x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor,
                          y: torch.Tensor | None, v: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    """du/dt = v·∂_x u + ∂_t u at x (B, C, H, W), t, t_end (B,) along dx/dt = v with t_end fixed, (B, C, H, W), by a
    central difference along (v, 1) in one fp32 pass of 2B items. Its error is O(h²) plus fp32 rounding / h, smallest
    near h = 1e-4 on a trained U-Net; it costs two forward passes where a forward-mode JVP costs several
    (docs/meanflow.md)."""
    y2 = torch.cat([y, y]) if y is not None else None
    x2, t2, end2 = torch.cat([x + h * v, x - h * v]), torch.cat([t + h, t - h]), torch.cat([t_end, t_end])
    up, down = model(x2, t2, y2, end2).chunk(2)
    return (up - down) / (2 * h)


@torch.no_grad()
def interval_target(plain: nn.Module, x: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor, y: torch.Tensor | None,
                    v: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Target (B, C, H, W) of u(x, t, t_end), in v's dtype, for x on the path at t < t_end (B,) with velocity v. alpha
    0: MeanFlow's v + (t_end - t)·du/dt (Geng et al. 2025, Eq. 10), du/dt by central difference in fp32. alpha in (0,
    1]: α-Flow's α·v + (1 - α)·u(x_s, s, t_end) at s = t + α·(t_end - t), x_s = x + α·(t_end - t)·v (Zhang et al. 2025,
    arXiv 2510.20771): a step of α of the interval along v, then the model's own average velocity over the rest, one
    forward under the caller's autocast. For small α it is u + α·(MeanFlow's target - u) + O(α²)."""
    if alpha > 0:
        step = alpha * (t_end - t)
        rest = plain(x + step.view(-1, 1, 1, 1) * v, t + step, y, t_end).float() if alpha < 1 else 0
        return alpha * v + (1 - alpha) * rest
    with torch.autocast(x.device.type, enabled=False):  # the difference needs fp32 (rounding / h)
        du_dt = difference_derivative(plain, x.float(), t, t_end, y, v)
    return v + (t_end - t).view(-1, 1, 1, 1) * du_dt.float()


def mean_flow_loss(net: nn.Module, x1: torch.Tensor, y: torch.Tensor | None, cfg: MeanFlowConfig, *,
                   label_dropout: float, x0: torch.Tensor | None = None, plain: nn.Module | None = None,
                   alpha: float = 0.0) -> torch.Tensor:
    """MeanFlow loss (Geng et al. 2025, Eq. 9-10) for data x1 (B, C, H, W) in [-1, 1]: ||u(x_t, t, t_end) -
    sg(target)||² per image, weighted by sg(1 / (||error||² + c)^p) (p = cfg.mf_weight_power; 0 is the MSE). The first
    round(share·B) items get an interval t < t_end (interval_target), the rest t_end = t, where the target is v = x1 -
    x0. cfg.mf_guidance w != 1 (as `resolved` once per run; None: 1) folds classifier-free guidance into the target
    (the paper's Eq. 13-14): v becomes w·v + (1 - w)·u(x_t, t, t | no label) for the items that kept their label, so one
    evaluation samples guided. The target runs without autograd on plain (the unwrapped module; net, under the
    caller's autocast, is what gradients flow through). alpha > 0 scales the interval items' weight by α, as α-Flow's
    released code does, so that under the adaptive weight the gradient keeps MeanFlow's scale while the error shrinks
    like α."""
    plain = net if plain is None else plain
    num_classes, guidance = plain.config.num_classes, 1.0 if cfg.mf_guidance is None else cfg.mf_guidance
    x0 = torch.randn_like(x1) if x0 is None else x0
    t, t_end = mean_flow_times(x1.shape[0], cfg.mf_share, cfg.mf_mu, cfg.mf_sigma, x1.device)
    if y is not None and label_dropout > 0:
        y = drop_labels(y, label_dropout, null_class=num_classes)
    xt, v = interpolate(x0, x1, t), (x1 - x0).float()
    k = round(cfg.mf_share * x1.shape[0])  # the items with t_end > t come first (mean_flow_times)
    with torch.no_grad():  # the target: velocities under the caller's autocast, the derivative in fp32
        if guidance != 1.0 and y is not None:
            kept = (y != num_classes).view(-1, 1, 1, 1)
            v_uncond = plain(xt, t, torch.full_like(y, num_classes)).float()
            v = torch.where(kept, guidance * v + (1 - guidance) * v_uncond, v)
        target = v.clone()
        if k:
            yk = y[:k] if y is not None else None
            target[:k] = interval_target(plain, xt[:k], t[:k], t_end[:k], yk, v[:k], alpha)
    error = (net(xt, t, y, t_end).float() - target).square().flatten(1).mean(1)  # per image
    weight = 1 / (error.detach() + ADAPTIVE_WEIGHT_EPS) ** cfg.mf_weight_power
    if alpha > 0:
        weight[:k] *= alpha
    return (weight * error).mean()


def grid_map_loss(net: nn.Module, path: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Flow-map distillation on a sampler's grid, for path (B, K + 1, C, H, W): a teacher's states at t = 0, 1/K, ...,
    1 (`reflow.py pairs --states`). Each item gets a step of an n-step sampler, n drawn evenly from the divisors of K
    (K = 4: one jump, two, four), and u(x_i, t_i, t_j) regresses onto (x_j - x_i) / (t_j - t_i), the average velocity of
    the teacher's solver over it: the teacher's n-step maps, learnt directly (no derivative, no bootstrapping; labels
    kept: the paths are of their class)."""
    b, k, device = path.shape[0], path.shape[1] - 1, path.device
    lengths = torch.tensor([k // n for n in range(1, k + 1) if k % n == 0], device=device)  # grid steps per jump
    length = lengths[torch.randint(len(lengths), (b,), device=device)]
    i = torch.floor(torch.rand(b, device=device) * (k // length)).long() * length  # a jump of that sampler
    j, rows = i + length, torch.arange(b, device=device)
    start, end, t, t_end = path[rows, i], path[rows, j], i / k, j / k
    target = (end - start) / (t_end - t).view(-1, 1, 1, 1)
    return F.mse_loss(net(start, t.to(start.dtype), y, t_end.to(start.dtype)).float(), target.float())


def grid_map_error(model: nn.Module, path: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """grid_map_loss without its draws, per item (B,): the squared error of every jump of every sampler on path's
    grid (B, K + 1, C, H, W), averaged per sampler, then evenly over the samplers, as training weighs them."""
    b, k = path.shape[0], path.shape[1] - 1
    per_sampler = []
    for length in (k // n for n in range(1, k + 1) if k % n == 0):
        errors = []
        for i in range(0, k, length):
            t, t_end = (torch.full((b,), s / k, device=path.device) for s in (i, i + length))
            target = (path[:, i + length] - path[:, i]) * (k / length)
            errors.append((model(path[:, i], t, y, t_end).float() - target.float()).square().flatten(1).mean(1))
        per_sampler.append(torch.stack(errors).mean(0))
    return torch.stack(per_sampler).mean(0)


VAL_NOISE_START = 1234  # validation item i uses noise sample VAL_NOISE_START + i of seed 0: a fixed validation loss


@torch.no_grad()
def validation_loss(model: nn.Module, data: Dataset, rt: Runtime, batch_size: int, t_points: int,
                    conditional: bool) -> float:
    """Mean flow-matching loss on held-out data (items (x1, y), or reflow pairs (x1, y, x0)) at a fixed grid of t_points
    times; item i's noise is sample VAL_NOISE_START + i of seed 0 (pairs bring their own), so the loss compares across
    epochs, batch sizes and numbers of processes, each rank taking a contiguous share (sums in fp64). Pairs with their
    paths (x1, y, x0, path) measure what a one-step model trains instead: grid_map_error, every jump fixed."""
    start, stop = len(data) * rt.rank // rt.world, len(data) * (rt.rank + 1) // rt.world
    ts, sums = (torch.arange(t_points) + 0.5) / t_points, torch.zeros(2, dtype=torch.float64, device=rt.device)
    for first in range(start, stop, batch_size):
        idx = range(first, min(first + batch_size, stop))
        x, y, *pair = default_collate([data[i] for i in idx])
        x, y = x.to(rt.device), y.to(rt.device) if conditional else None
        if len(pair) == 2:  # held-out paths: the jumps a one-step model learns
            sums[0] += grid_map_error(model, pair[1].to(rt.device), y).double().sum() * x[0].numel()
            sums[1] += x.numel()
            continue
        noise = None if pair else make_noise(len(idx), (t_points, *x.shape[1:]), 0, rt.device, VAL_NOISE_START + first)
        for k, t in enumerate(ts):
            x0, tb = pair[0].to(rt.device) if pair else noise[:, k], t.expand(len(x)).to(rt.device)
            sums[0] += F.mse_loss(model(interpolate(x0, x, tb), tb, y), x - x0, reduction="sum").double()
            sums[1] += x.numel()
    if rt.ddp:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()
