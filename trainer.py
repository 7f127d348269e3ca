"""The one training loop, shared by mnist_train.py and rectified_flow_train.py.

One code path for CPU, one GPU, DataParallel (--parallel dp) and DDP (launched by torchrun,
detected from WORLD_SIZE). Only rank 0 prints and writes files. The random state of a step is
derived from (seed, rank, step) and the data order from (seed, epoch), so a resumed run draws
exactly what an uninterrupted one would: resume needs no saved RNG state.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from budget import Budget, fit_horizon
from checkpoint import (CheckpointError, clean_state_dict, ema_weights, load_checkpoint, model_config_from, publish,
                        save_checkpoint)
from data import ShardedSampler
from device import (Runtime, configure_backends, keep_freed_memory, launched_ranks, resolve_amp, resolve_channels_last,
                    resolve_compile, setup_runtime)
from ema import EMA
from flow import (MF_DERIVATIVES, MF_TANGENTS, OBJECTIVES, T_SCHEDULES, curriculum_alpha, flow_matching_loss, interpolate,
                  mean_flow_loss)
from runlog import LOGGERS, RunLog
from sampling import can_guide, make_noise, recommended_sampler, sample_model, save_grid
from solvers import NFE_PER_STEP
from unet import ConditionalUNet, UNetConfig

LR_SCHEDULES = ("constant", "cosine", "linear")
# validation item i uses noise sample VAL_NOISE_START + i of seed 0: the fixed noise behind every validation loss
# the README reports
VAL_NOISE_START = 1234


@dataclass
class TrainConfig:
    """How to train; every field is a command-line flag of both training scripts."""

    epochs: int = 20  # passes over the training set
    batch_size: int = 64  # global batch, split over GPUs / DDP ranks
    lr: float = 1e-4  # AdamW learning rate after warm-up
    lr_schedule: str = "constant"  # after warm-up: constant | cosine | linear (both decay to 0 at the last epoch's end)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimizer steps
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # EMA decay (with warm-up), used for sampling and validation
    label_dropout: float = 0.1  # share of labels replaced by the null token (classifier-free guidance)
    t_schedule: str = "uniform"  # training-time distribution: uniform | logit-normal (flow matching; meanflow has its own)
    objective: str = "flow-matching"  # flow-matching | meanflow (average velocities: one-step sampling from this one run)
    mf_share: float = 0.25  # meanflow: share of each batch with t_end > t; the rest trains u(x, t, t) = v as flow matching
    mf_mu: float = -0.4  # meanflow: logit-normal mean of the two times, nearer the noise (the paper's lognorm(-0.4, 1) is 0.4 here)
    mf_sigma: float = 1.0  # meanflow: logit-normal standard deviation of the two times
    mf_weight_power: float = 1.0  # meanflow: adaptive loss weight 1 / (||error||^2 + 1e-3)^p per image; 0 = plain MSE
    mf_guidance: float = 1.0  # meanflow: guidance scale folded into the training target, so one pass samples guided; 1 = none
    mf_tangent: str = "conditional"  # meanflow: direction of du/dt: conditional (x1 - x0, the paper) | predicted (u(x, t, t), improved MeanFlow)
    mf_derivative: str = "difference"  # meanflow: du/dt by difference (central, fp32: two forwards) | jvp (forward-mode AD, ~6 forwards)
    mf_end_share: float = 0.0  # meanflow: share of the t_end > t items whose interval ends at the data (t_end = 1), as one jump's does
    mf_curriculum: float = 1.0  # meanflow: α-Flow curriculum over this share of training, the interval target annealed from flow matching to MeanFlow's; 0 = MeanFlow throughout
    t_grid: int = 0  # 0 = continuous t; k = t in {0, 1/k, ..., (k-1)/k}: trains a k-step Euler map (distillation)
    hflip: bool = False  # random horizontal flips (not for digits)
    seed: int = 0  # seeds data order, noise, times and dropout
    device: str = "auto"  # auto (CUDA, then Apple MPS, then CPU) | cpu | cuda | cuda:N | mps
    parallel: str = "auto"  # auto (DDP under torchrun, else one device) | dp (DataParallel) | none
    num_workers: int = 0  # data-loader worker processes
    amp: str = "none"  # autocast: none | bf16 | fp16 | auto (bf16 on GPUs and CPUs with native bf16, fp16 on older GPUs)
    channels_last: str = "auto"  # NHWC memory layout: on | off | auto (on, except CPU bf16 and MPS; see device.py)
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # deterministic cuDNN kernels, no TF32 (slower); off = cudnn.benchmark + TF32
    out_dir: str = "checkpoints"  # epoch_N.pth, last.pth, log.jsonl, loss.png, config.json
    checkpoint: str = "{out_dir}/best.pth"  # copy of the epoch chosen by --select-by
    select_by: str = "val-loss"  # which epoch the checkpoint holds: val-loss (the lowest) | last
    sample_dir: str = "{out_dir}/samples"  # one sample grid PNG per epoch
    resume: str = ""  # checkpoint to resume from, or "auto" for OUT_DIR/last.pth
    init_from: str = ""  # start from this checkpoint's EMA weights (same model config) instead of random ones
    save_every: float = 10.0  # minutes between saves of last.pth inside an epoch (crash safety); 0 = epoch ends only
    keep_last: int = 5  # epoch_N.pth files kept on disk; 0 keeps all
    log_every: int = 50  # steps between log.jsonl records and progress-bar updates
    logger: str = "jsonl"  # jsonl | tensorboard (also TensorBoard events in OUT_DIR/tensorboard; pip install tensorboard)
    val_t_points: int = 8  # validation loss averages over this fixed grid of t values
    max_steps: int = 0  # stop after this many optimizer steps in total (the LR schedule is unchanged); 0 = no limit
    time_budget: float = 0.0  # minutes for the whole run (steps, validation, grids): replaces --epochs, the LR schedule ends where the budget does; 0 = off
    time_limit: float = 0.0  # minutes the whole run may take at most: the planned epochs, or an earlier end (the LR decay fitted to it) if they would not fit; caps --time-budget too; 0 = off


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved (a ValueError, so the
    scripts print it as one line)."""


def run_kind(cfg: TrainConfig) -> str:
    """The kind a training script's checkpoints record: meanflow, or a first rectified flow."""
    return "meanflow" if cfg.objective == "meanflow" else "1-rectified"


def output_path(template: str, cfg: TrainConfig) -> Path:
    """A path flag with {out_dir} filled in."""
    return Path(template.replace("{out_dir}", cfg.out_dir))


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one optimizer step on one rank: distinct per rank, reproducible on resume."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def objective_model_config(cfg: TrainConfig, model_cfg: UNetConfig) -> UNetConfig:
    """The model config the objective trains: meanflow's U-Net takes the jump's end time too."""
    if model_cfg.average_velocity and cfg.objective != "meanflow":
        raise ValueError("--average-velocity is set by --objective meanflow; flow matching trains the velocity only")
    return replace(model_cfg, average_velocity=True) if cfg.objective == "meanflow" else model_cfg


def check_train_config(cfg: TrainConfig, world: int = 1) -> None:
    """Reject settings that would fail later (deep inside torch) or silently do nothing; world = processes."""
    choices = {"t_schedule": T_SCHEDULES, "objective": OBJECTIVES, "lr_schedule": LR_SCHEDULES, "amp": ("none", "bf16", "fp16", "auto"),
               "channels_last": ("on", "off", "auto"), "parallel": ("auto", "dp", "none"), "select_by": ("val-loss", "last"),
               "logger": LOGGERS, "mf_tangent": MF_TANGENTS, "mf_derivative": MF_DERIVATIVES}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"unknown {flag(name)} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    at_least = {"epochs": 1, "batch_size": 1, "log_every": 1, "val_t_points": 1, "warmup_steps": 0, "num_workers": 0,
                "t_grid": 0, "keep_last": 0, "max_steps": 0, "weight_decay": 0, "grad_clip": 0, "save_every": 0, "time_budget": 0,
                "time_limit": 0}
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            raise ValueError(f"{flag(name)} must be >= {low}, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    for name in ("ema_decay", "label_dropout", "mf_share", "mf_end_share", "mf_curriculum"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"{flag(name)} must lie in [0, 1], got {getattr(cfg, name)}")
    if not (cfg.mf_sigma > 0 and cfg.mf_weight_power >= 0 and cfg.mf_guidance >= 0):
        raise ValueError(f"--mf-sigma must be > 0, --mf-weight-power and --mf-guidance >= 0 (got {cfg.mf_sigma}, "
                         f"{cfg.mf_weight_power}, {cfg.mf_guidance})")
    if cfg.objective == "meanflow" and cfg.t_grid:
        raise ValueError("--t-grid (k-step distillation) trains a velocity at k times; --objective meanflow "
                         "trains average velocities: use one of the two")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes (one batch share each)")


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up, then constant or decaying to 0 at total_steps."""
    if step < cfg.warmup_steps or cfg.lr_schedule == "constant":
        return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)


@dataclass
class Parts:
    """What a training step touches."""

    model: ConditionalUNet  # the plain module: what is saved and averaged
    net: nn.Module  # the model as called: compiled and/or wrapped for DDP / DataParallel
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object  # context manager: bf16/fp16 autocast, or a no-op
    amp: str  # none | bf16 | fp16, as resolved for the device
    channels_last: bool  # whether inputs and weights are NHWC


def build(cfg: TrainConfig, model_cfg: UNetConfig, rt: Runtime) -> Parts:
    """Model, EMA, optimizer, grad scaler and autocast for cfg on rt's device."""
    keep_freed_memory()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    amp = resolve_amp(cfg.amp, rt.device)
    if cfg.amp == "fp16" and amp == "none" and rt.main:
        print("--amp fp16: the CPU has no fast fp16 autocast (slower than fp32), so this run trains in fp32")
    channels_last = resolve_channels_last(cfg.channels_last, rt.device, amp)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = ConditionalUNet(model_cfg).to(rt.device, memory_format=memory_format)
    net: nn.Module = torch.compile(model) if resolve_compile(cfg.compile, rt.device) else model
    if rt.ddp:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    elif cfg.parallel == "dp":
        net = nn.DataParallel(net)  # on CPU or a single GPU this simply calls the module
    autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "none" else nullcontext())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=rt.device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp == "fp16")
    return Parts(model, net, EMA(model, cfg.ema_decay), optimizer, scaler, autocast, amp, channels_last)


def train_step(parts: Parts, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor | None, step: int, rank: int = 0,
               lr: float | None = None, x0: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """One optimizer step on a batch already on the device (x: (B, C, H, W) in [-1, 1]); returns the loss.

    x0: the noise of reflow pairs (x0, x), or None for fresh noise; alpha: meanflow's α-Flow step (mean_flow_loss)."""
    torch.manual_seed(step_seed(cfg.seed, rank, step))
    if parts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg.hflip:  # (refused for pairs: flipping would break the noise-image coupling)
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    for group in parts.optimizer.param_groups:
        group["lr"] = cfg.lr if lr is None else lr
    with parts.autocast:
        if cfg.objective == "meanflow":  # du/dt runs on the plain module (parts.model), the loss through parts.net
            loss = mean_flow_loss(parts.net, x, y, parts.model.config.num_classes, cfg.label_dropout, x0, parts.model,
                                  cfg.mf_share, cfg.mf_mu, cfg.mf_sigma, cfg.mf_weight_power, cfg.mf_guidance,
                                  cfg.mf_tangent, cfg.mf_derivative, cfg.mf_end_share, alpha)
        else:
            loss = flow_matching_loss(parts.net, x, y, parts.model.config.num_classes, cfg.label_dropout,
                                      cfg.t_schedule, x0, cfg.t_grid)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.ema.update(parts.model)
    return loss.detach()


def check_same_model(ckpt: dict, model_cfg: UNetConfig, path: str) -> None:
    """The checkpoint must hold the model we are about to train."""
    stored = model_config_from(ckpt)
    if stored != model_cfg:
        diff = [f"{k}: {v} vs {getattr(model_cfg, k)}" for k, v in asdict(stored).items() if getattr(model_cfg, k) != v]
        raise CheckpointError(f"{path} was trained with another model config ({', '.join(diff)}); "
                              "pass the same model flags/preset as that run, or start a new --out-dir")


def check_resume(ckpt: dict, model_cfg: UNetConfig, cfg: TrainConfig, steps_per_epoch: int, world: int, path: str) -> None:
    """The checkpoint must hold the model we are about to train, and the same steps per epoch.

    Another batch size, number of processes or training set changes how steps map to epochs and
    data, so the resumed run would silently train on other batches: refused.
    """
    check_same_model(ckpt, model_cfg, path)
    was = {"--batch-size": ckpt.get("train_config", {}).get("batch_size"), "processes": ckpt.get("world_size", 1),
           "steps per epoch": ckpt.get("steps_per_epoch")}
    now = {"--batch-size": cfg.batch_size, "processes": world, "steps per epoch": steps_per_epoch}
    diff = [f"{k} {was[k]} then, {now[k]} now" for k in was if was[k] is not None and was[k] != now[k]]
    if diff:
        raise CheckpointError(f"cannot resume {path} exactly: {'; '.join(diff)}. Resume with the same batch size, "
                              "number of processes and data, or start a new --out-dir (with --init-from to keep the weights)")


def restore(parts: Parts, ckpt: dict) -> None:
    """Weights, EMA, optimizer and (when both runs use one) the fp16 grad scaler from a checkpoint."""
    parts.model.load_state_dict(clean_state_dict(ckpt["model_state"]))
    parts.ema.load_state_dict({**ckpt["ema_state"], "weights": clean_state_dict(ckpt["ema_state"]["weights"])})
    parts.optimizer.load_state_dict(ckpt["optimizer_state"])
    if ckpt.get("scaler_state"):  # empty when the run was not fp16: then start with a fresh scaler
        parts.scaler.load_state_dict(ckpt["scaler_state"])


@torch.no_grad()
def validation_loss(model: nn.Module, data: Dataset, rt: Runtime, batch_size: int, t_points: int, conditional: bool) -> float:
    """Mean flow-matching loss on held-out data with fixed noise and a fixed t grid: comparable across epochs.

    Items are (x1, y) or reflow pairs (x1, y, x0). Under DDP each rank takes a contiguous share and the sums
    are all-reduced; noise depends only on the sample's index, so the value does not depend on the number
    of processes or the batch size.
    """
    start, stop = len(data) * rt.rank // rt.world, len(data) * (rt.rank + 1) // rt.world
    ts = (torch.arange(t_points) + 0.5) / t_points
    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)  # squared error, element count
    for first in range(start, stop, batch_size):
        idx = range(first, min(first + batch_size, stop))
        x, y, *pair = default_collate([data[i] for i in idx])
        x = x.to(rt.device)
        y = y.to(rt.device) if conditional else None
        noise = make_noise(len(idx), (t_points, *x.shape[1:]), 0, rt.device, start=VAL_NOISE_START + first) if not pair else None
        for k, t in enumerate(ts):
            x0 = pair[0].to(rt.device) if pair else noise[:, k]  # reflow pairs: the pair's own noise
            tb = t.expand(len(x)).to(rt.device)
            sums[0] += F.mse_loss(model(interpolate(x0, x, tb), tb, y), x - x0, reduction="sum").double()
            sums[1] += x.numel()
    if rt.ddp:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def plot_losses(log_path: Path, png_path: Path) -> None:
    """Loss curve PNG from log.jsonl: training loss per log interval, validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "epoch" and r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss (EMA)")
    ax.set(xlabel="optimizer step", ylabel="flow-matching MSE", yscale="log")
    if train or val:  # a run shorter than --log-every without validation has nothing to label
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class StopRequest:
    """Ctrl-C as a flag checked between steps, so a checkpoint never holds a half-applied step.

    A second Ctrl-C interrupts at once. Outside the main thread (where signals cannot be caught) it is a no-op.
    """

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step (press again to quit without saving)", flush=True)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def agreed(self, rt: Runtime) -> bool:
        """Whether any rank was asked to stop: all ranks must leave the loop at the same step."""
        if not rt.ddp:
            return self.requested
        flag = torch.tensor(float(self.requested), device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def ignore_sigint(_worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the main process, which stops cleanly between steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def global_mean(value: torch.Tensor, rt: Runtime) -> float:
    """Mean of a per-rank scalar over all ranks."""
    if rt.ddp:
        value = value.clone()
        dist.all_reduce(value)
        value /= rt.world
    return value.item()


class Trainer:
    """One training run: the state that checkpoints hold, and the phases of the loop."""

    def __init__(self, cfg: TrainConfig, model_cfg: UNetConfig, train_set: Dataset, val_set: Dataset | None,
                 class_names: list[str] | None, extra: dict | None):
        check_train_config(cfg, launched_ranks()[1])  # before joining a process group
        self.rt = setup_runtime(cfg.device, cfg.parallel)
        configure_backends(cfg.deterministic)
        self.cfg, self.model_cfg, self.val_set, self.class_names, self.extra = cfg, model_cfg, val_set, class_names, extra or {}
        self.say = tqdm.write if self.rt.main else (lambda text: None)  # tqdm.write: a line above the bar, not on it
        self.out_dir = Path(cfg.out_dir)
        self.best_path, self.sample_dir = output_path(cfg.checkpoint, cfg), output_path(cfg.sample_dir, cfg)
        self.conditional = model_cfg.num_classes is not None
        self.model_cfg = model_cfg = objective_model_config(cfg, model_cfg)
        if cfg.mf_guidance != 1 and cfg.objective == "meanflow" and not can_guide(model_cfg.num_classes, cfg.label_dropout):
            raise ValueError(f"--mf-guidance {cfg.mf_guidance} folds classifier-free guidance into training: it needs "
                             "classes and --label-dropout > 0 (the unconditional velocity it guides against)")
        if cfg.hflip and getattr(train_set, "paired", False):
            raise ValueError("--hflip cannot be used with reflow pairs: a flipped image is not the pair of its noise")
        self.parts = build(cfg, model_cfg, self.rt)
        self.per_rank = cfg.batch_size // self.rt.world
        self.sampler = ShardedSampler(len(train_set), self.per_rank, cfg.seed, self.rt.rank, self.rt.world)
        if self.sampler.batches == 0:
            raise ValueError(f"{len(train_set)} training images do not fill one batch of {self.per_rank} per process: "
                             "lower --batch-size")
        self.loader = DataLoader(train_set, batch_size=self.per_rank, sampler=self.sampler, drop_last=True,
                                 num_workers=cfg.num_workers, pin_memory=self.rt.device.type == "cuda",
                                 persistent_workers=cfg.num_workers > 0, worker_init_fn=ignore_sigint)
        # the minutes the run is fitted to: --time-budget, capped by --time-limit; 0 = neither flag
        self.minutes = min((m for m in (cfg.time_budget, cfg.time_limit) if m), default=0.0)
        self.budget: Budget | None = None  # set when the run starts, if self.minutes
        self.fitted, self.reported = False, 0  # whether the horizon was fitted to the minutes; the last one printed
        self.set_horizon(cfg.epochs * self.sampler.batches)  # under a budget: until the first fit
        self.step, self.best_val, self.loss = 0, math.inf, math.nan

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self.step // self.sampler.batches

    @property
    def epoch_number(self) -> int:
        """Epochs begun: names the files of an epoch end, also of a last epoch that --time-budget cuts short."""
        return math.ceil(self.step / self.sampler.batches)

    @property
    def planned(self) -> str:
        """Epochs the run will train, for progress lines: "?" until a --time-budget is fitted."""
        return "?" if self.cfg.time_budget and not self.fitted else str(math.ceil(self.schedule_steps / self.sampler.batches))

    def set_horizon(self, steps: int) -> None:
        """The LR schedule decays to 0 at `steps`, where the run ends (or earlier, at --max-steps)."""
        self.schedule_steps = steps
        self.total_steps = min(steps, self.cfg.max_steps) if self.cfg.max_steps else steps

    def refit(self) -> None:
        """Move the horizon to the last step that the time left allows (all ranks agree); under --time-limit
        alone, never past the planned epochs."""
        measured = torch.tensor(self.budget.measures(), dtype=torch.float64, device=self.rt.device)
        if self.rt.ddp:
            dist.all_reduce(measured, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        elapsed, step_s, end_s = measured.tolist()
        horizon = fit_horizon(self.step, elapsed, step_s, end_s, self.sampler.batches, self.budget.seconds)
        if not self.cfg.time_budget:
            horizon = min(horizon, self.cfg.epochs * self.sampler.batches)
        if self.fitted and horizon == self.step < self.schedule_steps:  # e.g. an epoch end that ran long
            self.say(f"time budget spent at step {self.step}, before the planned end at {self.schedule_steps}: stopping")
        elif not self.fitted or abs(horizon - self.reported) > 0.02 * self.reported:
            self.reported = horizon
            self.say(f"time budget {self.minutes:g} min: {elapsed / 60:.1f} min used, {step_s:.3f} s/step, "
                     f"{end_s:.1f} s per epoch end -> training ends at step {horizon} "
                     f"({horizon / self.sampler.batches:.2f} epochs)")
            if not self.fitted and end_s > 0.25 * self.budget.seconds:
                self.say(f"each epoch end (validation, checkpoint, sample grid) takes ~{end_s:.0f} s, over a quarter of "
                         "the budget: a lower --val-size or --val-t-points leaves more of it to training")
        self.set_horizon(horizon)
        self.fitted = True

    def resume(self) -> int | None:
        """Load --resume (or OUT_DIR/last.pth for auto); returns the step resumed at, or None for a fresh run."""
        path = str(self.out_dir / "last.pth") if self.cfg.resume == "auto" else self.cfg.resume
        if not path:
            if self.cfg.init_from:
                self.initialise(self.cfg.init_from)
            return None
        ckpt = load_checkpoint(path, map_location=self.rt.device)
        check_resume(ckpt, self.model_cfg, self.cfg, self.sampler.batches, self.rt.world, path)
        restore(self.parts, ckpt)
        self.step, self.best_val = ckpt["step"], ckpt.get("best_val_loss", math.inf)
        if self.minutes and ckpt.get("horizon_fitted"):  # finish the run as it was planned, not a new budget
            self.set_horizon(ckpt["schedule_steps"])
            self.fitted = True
            self.say(f"time budget: keeping the resumed run's end at step {self.schedule_steps}")
        self.say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, {self.step % self.sampler.batches} "
                 "steps into the next)")
        return self.step

    def initialise(self, path: str) -> None:
        """--init-from: raw and EMA weights both start from the checkpoint's EMA weights (its best estimate)."""
        ckpt = load_checkpoint(path, map_location=self.rt.device)
        check_same_model(ckpt, self.model_cfg, path)
        weights = clean_state_dict(ema_weights(ckpt))
        self.parts.model.load_state_dict(weights)
        self.parts.ema.model.load_state_dict(weights)
        self.say(f"initialised from the EMA weights of {path}")

    def state(self, val: float | None) -> dict:
        """The checkpoint dict: enough to resume exactly and to sample."""
        p = self.parts
        return {
            "epoch": self.epoch_number, "step": self.step, "loss": self.loss, "val_loss": val, "best_val_loss": self.best_val,
            "steps_per_epoch": self.sampler.batches, "world_size": self.rt.world,
            "schedule_steps": self.schedule_steps, "horizon_fitted": self.fitted,
            "model_state": p.model.state_dict(), "ema_state": p.ema.state_dict(),
            "optimizer_state": p.optimizer.state_dict(), "scaler_state": p.scaler.state_dict(),
            "model_config": asdict(self.model_cfg), "train_config": asdict(self.cfg), "class_names": self.class_names,
            **self.extra,  # kind, sampler, lineage: named by the script that trains
        }

    def save_last(self, reason: str) -> None:
        """last.pth in the middle of an epoch: usable for sampling and exact --resume."""
        if self.rt.main:
            save_checkpoint(self.out_dir / "last.pth", self.state(None))
            self.say(f"{reason} at step {self.step}, inside epoch {self.epoch + 1}: saved {self.out_dir / 'last.pth'}; "
                     "continue with --resume auto")

    def run(self) -> dict:
        """Train until total_steps, Ctrl-C or the end; returns a summary."""
        cfg, rt = self.cfg, self.rt
        resumed = self.resume()
        log = None
        if rt.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(
                {"train": asdict(cfg), "model": asdict(self.model_cfg), **self.extra}, indent=2))
            log = RunLog(self.out_dir, resumed, cfg.logger)
        if self.minutes and not self.fitted:  # (a resumed budget run keeps its fitted end)
            val_forwards = len(self.val_set) * cfg.val_t_points // rt.world if self.val_set is not None else 0
            self.budget = Budget(self.minutes, val_forwards + self.grid_forwards(), self.per_rank, fit_early=not rt.ddp)
        n_params = sum(p.numel() for p in self.parts.model.parameters())
        self.say(f"training {n_params / 1e6:.2f}M parameters on {rt.device} x{rt.world}, {self.sampler.size} images, "
                 f"{self.sampler.batches} steps/epoch, batch {cfg.batch_size}, "
                 f"{f'for {self.minutes:g} min' if self.budget and cfg.time_budget else f'until step {self.total_steps}'}"
                 f"{f' (at most {cfg.time_limit:g} min)' if self.budget and cfg.time_limit else ''}; "
                 f"autocast {self.parts.amp}, {'channels_last' if self.parts.channels_last else 'NCHW'}, "
                 f"lr {cfg.lr:g} {cfg.lr_schedule}")
        self.start_time = time.perf_counter()
        try:
            with StopRequest() as stop:
                while self.step < self.total_steps:
                    finished = self.train_epoch(log, stop)
                    if not finished:
                        break
                    self.end_epoch(log)
                    if self.budget and (self.step < self.schedule_steps or not self.fitted):  # not after the last end
                        self.budget.end_done()
                        self.refit()
                    if stop.agreed(rt):
                        self.say("Ctrl-C: stopped at an epoch end; continue with --resume auto")
                        break
        finally:
            if log:
                log.close()
            if rt.ddp:
                dist.destroy_process_group()
        files = [p for p in (self.best_path, self.out_dir / "last.pth") if p.is_file()] if rt.main else []
        return {"step": self.step, "epoch": self.epoch, "loss": self.loss, "best_val_loss": self.best_val,
                "checkpoint": str(self.best_path) if self.best_path.is_file() else None, "files": [str(p) for p in files],
                "elapsed_s": time.perf_counter() - self.start_time, "model": self.parts.model, "ema": self.parts.ema.model}

    def train_epoch(self, log, stop: StopRequest) -> bool:
        """Steps until the epoch's end (True) or an early stop: --max-steps or Ctrl-C (False, last.pth saved)."""
        cfg, rt, parts = self.cfg, self.rt, self.parts
        epoch, first = self.epoch, self.step
        self.sampler.set_epoch(epoch, self.step - epoch * self.sampler.batches)
        parts.net.train()
        loss_sum, window_start, window_sum = torch.zeros((), device=rt.device), self.step, 0.0
        first_bad = torch.full((), -1, device=rt.device)  # the first step whose loss was not finite, kept on the device
        last_save = time.monotonic()
        self.epoch_start = time.perf_counter()
        if self.budget:
            self.budget.epoch_started()
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.planned}", disable=not rt.main, leave=False, dynamic_ncols=True)
        curriculum = cfg.mf_curriculum if cfg.objective == "meanflow" else 0.0  # flow matching has no α
        for x, y, *pair in bar:
            x = x.to(rt.device, non_blocking=True)
            y = y.to(rt.device, non_blocking=True) if self.conditional else None
            x0 = pair[0].to(rt.device, non_blocking=True) if pair else None
            lr = learning_rate(cfg, self.step, self.schedule_steps)
            alpha = curriculum_alpha(self.step / self.schedule_steps, curriculum)
            loss = train_step(parts, cfg, x, y, self.step, rt.rank, lr, x0, alpha)
            first_bad = torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, self.step + 1)
            loss_sum += loss
            self.step += 1
            if self.step % cfg.log_every == 0:  # a host sync; besides it, only DDP's per-step stop check syncs
                total = global_mean(loss_sum, rt)
                self.check_finite(total, first_bad, window_start)
                mean, window_start, window_sum = (total - window_sum) / (self.step - window_start), self.step, total
                bar.set_postfix(loss=f"{mean:.4f}")
                if log:
                    log.write({"kind": "step", "step": self.step, "epoch": epoch, "loss": mean, "lr": lr,
                               **({"mf_alpha": alpha} if curriculum else {})})
            at_epoch_end = self.step % self.sampler.batches == 0  # (then the budget is refitted after that end, counting it)
            fit_now = not at_epoch_end and (not self.fitted or self.step % cfg.log_every == 0)
            if self.budget and self.budget.step_done() and fit_now:
                self.refit()  # (log steps are common to all ranks: refit's all-reduce is safe there)
                bar.set_description(f"epoch {epoch + 1}/{self.planned}", refresh=False)
            if at_epoch_end or self.step == self.schedule_steps:
                break  # the epoch's last step, or the run's (--time-budget): end_epoch saves
            if stop.agreed(rt) or self.step >= self.total_steps:
                bar.close()
                self.loss = global_mean(loss_sum, rt) / (self.step - first)
                self.check_finite(self.loss, first_bad, first)
                self.save_last("Ctrl-C" if stop.requested else "stopped by --max-steps")
                return False
            if rt.main and cfg.save_every and time.monotonic() - last_save >= 60 * cfg.save_every:
                self.loss = loss_sum.item() / (self.step - first)  # rank 0's share: no collective off the common path
                if math.isfinite(self.loss):  # (else the next log step stops every rank together)
                    self.save_last("periodic save")
                last_save = time.monotonic()
        bar.close()
        self.loss = global_mean(loss_sum, rt) / max(self.step - first, 1)
        self.check_finite(self.loss, first_bad, first)
        self.epoch_seconds, self.epoch_steps = time.perf_counter() - self.epoch_start, self.step - first
        return True

    def check_finite(self, loss: float, first_bad: torch.Tensor, since: int) -> None:
        """Stop the run, saving nothing more, once a loss is NaN or infinite: the weights after it are lost."""
        if math.isfinite(loss):
            return
        step = int(first_bad)
        where = f"at step {step}" if step > 0 else f"on another process, between steps {since + 1} and {self.step}"
        last = self.out_dir / "last.pth"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        raise TrainingDiverged(f"the training loss became {loss} {where}: stopped, and {kept}. A lower --lr, "
                               "--grad-clip or (meanflow) a lower --mf-share or --mf-weight-power may keep it finite")

    def end_epoch(self, log) -> None:
        """Validate (all ranks), then on rank 0: log, save the epoch, publish last/best, draw a grid, plot."""
        cfg, rt, ema = self.cfg, self.rt, self.parts.ema
        val = (validation_loss(ema.model, self.val_set, rt, self.per_rank, cfg.val_t_points, self.conditional)
               if self.val_set is not None else None)
        improved = (val if val is not None else self.loss) < self.best_val
        if improved:
            self.best_val = val if val is not None else self.loss
        if rt.main:
            record = {"kind": "epoch", "epoch": self.epoch_number, "step": self.step, "loss": self.loss, "val_loss": val,
                      "images_per_s": self.epoch_steps * cfg.batch_size / self.epoch_seconds, "epoch_s": self.epoch_seconds,
                      "elapsed_s": time.perf_counter() - self.start_time,
                      "lr": self.parts.optimizer.param_groups[0]["lr"]}
            log.write(record)
            epoch_path = self.out_dir / f"epoch_{self.epoch_number}.pth"
            save_checkpoint(epoch_path, self.state(val))
            publish(epoch_path, self.out_dir / "last.pth")
            if improved or cfg.select_by == "last":
                publish(epoch_path, self.best_path)
            if cfg.keep_last:
                (self.out_dir / f"epoch_{self.epoch_number - cfg.keep_last}.pth").unlink(missing_ok=True)
            log.image("samples", self.draw_grid(), self.step)
            plot_losses(self.out_dir / "log.jsonl", self.out_dir / "loss.png")
            val_text = f"val {val:.4f}{' (best)' if improved else ''}  " if val is not None else ""
            self.say(f"epoch {self.epoch_number}/{self.planned}  step {self.step}  loss {self.loss:.4f}  {val_text}"
                     f"{record['images_per_s']:.0f} img/s  elapsed {record['elapsed_s'] / 60:.1f} min")
        if rt.ddp:
            dist.barrier()  # the other ranks wait here, not inside the next step's all-reduce

    def grid_request(self) -> tuple[int, torch.Tensor | None]:
        """(images, labels) of an epoch's sample grid: 10 per class for up to 10 classes, or 64 without classes."""
        if not self.conditional:
            return 64, None
        labels = torch.arange(min(self.model_cfg.num_classes, 10)).repeat_interleave(10)
        return len(labels), labels

    def grid_forwards(self) -> int:
        """Network evaluations of one sample grid (rank 0 draws it; the other ranks wait as long)."""
        solver, steps, guidance = recommended_sampler(self.extra)
        passes = 2 if self.conditional and guidance != 1 else 1  # guided: conditional + unconditional
        return self.grid_request()[0] * steps * NFE_PER_STEP.get(solver, 6) * passes  # dopri5: ~6 a step

    def draw_grid(self) -> Path:
        """SAMPLE_DIR/epoch_N.png from the EMA weights: one row per class (up to 10), or 64 images; returns its path."""
        n, labels = self.grid_request()
        solver, steps, guidance = recommended_sampler(self.extra)  # what users of the checkpoint will get
        samples = sample_model(self.parts.ema.model, n, labels, solver, steps, guidance, seed=0, device=self.rt.device)
        return save_grid(samples.images, self.sample_dir / f"epoch_{self.epoch_number}.png", samples.labels,
                         self.class_names)


def train(
    cfg: TrainConfig,
    model_cfg: UNetConfig,
    train_set: Dataset,
    val_set: Dataset | None = None,
    class_names: list[str] | None = None,
    extra: dict | None = None,
) -> dict:
    """Train a ConditionalUNet with the rectified-flow objective; returns a summary of the run."""
    return Trainer(cfg, model_cfg, train_set, val_set, class_names, extra).run()
