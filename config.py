"""TrainConfig: how to train, every field a flag of the training scripts; RunConfig: a run's configs after check_run,
the one check they get, before any data is read."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

from budget import LR_SCHEDULES
from cli import changed_flags, flag
from flow import COUPLINGS, OBJECTIVES, T_SCHEDULES, MeanFlowConfig, can_guide
from device import launched_ranks
from matching import MatchConfig
from runlog import LOGGERS, check_writable, keep_earlier_run, output_path
from unet import ModelConfig, check_config


@dataclass
class TrainConfig:
    """How to train; every field is a command-line flag of the training scripts."""

    renamed: ClassVar[dict[str, str]] = {"--checkpoint": "out"}  # old spellings users' scripts may hold: still taken

    epochs: float = 20  # passes over the training set; a fraction ends the run inside the last one
    batch_size: int = 64  # global batch, split over GPUs / DDP ranks
    lr: float = 1e-4  # AdamW learning rate after warm-up
    lr_schedule: str = "constant"  # after warm-up: constant | cosine | linear (both decay to 0 at the run's end)
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW's first-moment decay (0: no momentum, as distribution matching's second stage)
    adam_beta2: float = 0.999  # AdamW's second-moment decay (0.95 suits runs of a few hundred steps)
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimizer steps
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # EMA decay (with warm-up), used for sampling and validation
    label_dropout: float = 0.1  # share of labels replaced by the null token (classifier-free guidance)
    t_schedule: str = "uniform"  # training-time distribution: uniform | logit-normal (flow matching)
    t_mu: float = 0.0  # logit-normal location; < 0 trains more near the noise end t = 0 (MNIST's preset: -0.5)
    objective: str = "flow-matching"  # flow-matching | meanflow (average velocities: one-step sampling, one run)
    coupling: str = "independent"  # noise for each image: independent | ot (minibatch optimal transport per class)
    t_grid: int = 0  # 0 = continuous t; k = t in {0, 1/k, ..., (k-1)/k}: trains a k-step Euler map (distillation)
    hflip: bool = False  # random horizontal flips (not for digits)
    seed: int = 0  # seeds data order, noise, times and dropout
    device: str = "auto"  # auto (CUDA, then Apple MPS, then CPU) | cpu | cuda | cuda:N | mps
    parallel: str = "auto"  # auto (DDP under torchrun, else one device) | dp (DataParallel) | none
    num_workers: int = 0  # data-loader worker processes
    amp: str = "none"  # autocast: none | bf16 | fp16 | auto (bf16 where native, fp16 on older GPUs, else none)
    channels_last: str = "auto"  # NHWC memory layout: on | off | auto (where faster; see device.py)
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # deterministic cuDNN kernels, no TF32 (slower); off = cudnn.benchmark + TF32
    out_dir: str = "checkpoints"  # epoch_N.pth, last.pth, log.jsonl, loss.png, config.json
    out: str = "{out_dir}/best.pth"  # the checkpoint to use: a copy of the epoch chosen by --select-by
    select_by: str = "val-loss"  # which epoch the checkpoint holds: val-loss (the lowest) | last
    sample_dir: str = "{out_dir}/samples"  # sample grid PNGs, epoch_N.png
    sample_every: int = 1  # epochs between sample grids (the run's last epoch always draws one)
    resume: str = ""  # checkpoint to resume from, or "auto" for OUT_DIR/last.pth
    existing: str = "move"  # a fresh run into an --out-dir holding another run: move it to OUT_DIR.N | refuse
    init_from: str = ""  # start from this checkpoint's EMA weights (same model config) instead of random ones
    save_every: float = 10.0  # minutes between saves of last.pth inside an epoch (crash safety); 0 = epoch ends only
    keep_last: int = 5  # epoch_N.pth files kept on disk; 0 keeps all
    log_every: int = 50  # steps between log.jsonl records and progress-bar updates
    logger: str = "jsonl"  # jsonl | tensorboard (OUT_DIR/tensorboard) | wandb (WANDB_MODE=offline needs no account)
    val_t_points: int = 8  # validation loss averages over this fixed grid of t values
    max_steps: int = 0  # stop after this many optimizer steps in total (the LR schedule is unchanged); 0 = no limit
    time_budget: float = 0.0  # minutes for the whole run, replacing --epochs; the LR schedule ends with it; 0 = off
    time_limit: float = 0.0  # minutes the run may take at most: the epochs, or an earlier fitted end; 0 = off


# values past these run for days, fill no machine's memory or change nothing: refused as typing slips
AT_MOST = {"epochs": 100_000, "batch_size": 1 << 20, "num_workers": 256, "val_t_points": 1000, "lr": 10.0,
           "warmup_steps": 10**8, "t_grid": 10_000, "sample_every": 10**6, "log_every": 10**8,
           "time_budget": 10**6, "time_limit": 10**6, "save_every": 10**6, "grad_clip": 10**6, "weight_decay": 10.0}


@dataclass(frozen=True)
class RunConfig:
    """A run's configs as check_run passed them: how to train, the model the objective trains, MeanFlow's settings
    (resolved; None for flow matching) and distribution matching's (None: off). trainer.train takes nothing else."""

    train: TrainConfig
    model: ModelConfig
    meanflow: MeanFlowConfig | None = None
    match: MatchConfig | None = None


def check_run(cfg: TrainConfig, model_cfg: ModelConfig, meanflow: MeanFlowConfig | None = None,
              match: MatchConfig | None = None) -> RunConfig:
    """The one check of a run's configs, made before any data is read: impossible settings, the model, the output
    paths (main process), MeanFlow's and distribution matching's refusals; returns what the loop trains."""
    rank, world, _ = launched_ranks()
    check_train_config(cfg, world)
    check_config(model_cfg)
    if model_cfg.num_classes is None and cfg.label_dropout not in (0, TrainConfig.label_dropout):
        raise ValueError(f"--label-dropout {cfg.label_dropout} drops labels, but this model is unconditional (no "
                         "--num-classes, no --class-from-folders): there are none to drop (leave the flag out)")
    model_cfg = objective_model_config(cfg, model_cfg)
    if rank == 0:
        check_outputs(cfg)
    if match is not None:
        match.check()
    match = match if match and match.dm_weight else None
    if match and cfg.objective != "meanflow":
        raise ValueError("--dm-weight matches a one-step model's jumps to its teacher: it needs `reflow.py distill "
                         "--objective meanflow`")
    return RunConfig(cfg, model_cfg, resolve_meanflow(cfg, model_cfg, meanflow), match)


def run_kind(cfg: TrainConfig) -> str:
    """The kind a training script's checkpoints record: meanflow, or a first rectified flow."""
    return "meanflow" if cfg.objective == "meanflow" else "1-rectified"


def objective_model_config(cfg: TrainConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The model config the objective trains: meanflow's U-Net takes the jump's end time too."""
    if model_cfg.average_velocity and cfg.objective != "meanflow":
        raise ValueError("--average-velocity is set by --objective meanflow; flow matching trains the velocity only")
    return replace(model_cfg, average_velocity=True) if cfg.objective == "meanflow" else model_cfg


def resolve_meanflow(cfg: TrainConfig, model_cfg: ModelConfig, meanflow: MeanFlowConfig | None
                     ) -> MeanFlowConfig | None:
    """The run's MeanFlow config, checked and its folded guidance resolved once (checkpoints record it); None for
    flow matching."""
    meanflow = meanflow or MeanFlowConfig()
    if cfg.objective != "meanflow":
        if changed := changed_flags(meanflow):
            raise ValueError(f"{changed[0]} shapes MeanFlow's training: it needs --objective meanflow")
        return None
    return meanflow.resolved(can_guide(model_cfg.num_classes, cfg.label_dropout))


def check_train_config(cfg: TrainConfig, world: int = 1) -> None:
    """Reject settings that would fail later (deep inside torch) or silently do nothing; world = processes."""
    choices = {"t_schedule": T_SCHEDULES, "objective": OBJECTIVES, "lr_schedule": LR_SCHEDULES,
               "amp": ("none", "bf16", "fp16", "auto"), "channels_last": ("on", "off", "auto"),
               "parallel": ("auto", "dp", "none"), "select_by": ("val-loss", "last"), "logger": LOGGERS,
               "existing": ("move", "refuse"), "coupling": COUPLINGS}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"unknown {flag(name)} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    at_least = {"batch_size": 1, "log_every": 1, "val_t_points": 1, "warmup_steps": 0, "num_workers": 0,
                "t_grid": 0, "keep_last": 0, "max_steps": 0, "weight_decay": 0, "grad_clip": 0, "save_every": 0,
                "time_budget": 0, "time_limit": 0, "sample_every": 1}
    for name, low in at_least.items():
        if not getattr(cfg, name) >= low:  # (not >=: NaN fails too)
            raise ValueError(f"{flag(name)} must be >= {low}, got {getattr(cfg, name)}")
    for name in ("lr", "epochs"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{flag(name)} must be > 0, got {getattr(cfg, name)}")
    for name, most in AT_MOST.items():
        if getattr(cfg, name) > most:
            raise ValueError(f"{flag(name)} must be at most {most:,} (no run means more), got {getattr(cfg, name)}")
    for name in ("ema_decay", "label_dropout"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"{flag(name)} must lie in [0, 1], got {getattr(cfg, name)}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"{flag(name)} must lie in [0, 1), got {getattr(cfg, name)}")
    if cfg.label_dropout == 1:
        raise ValueError("--label-dropout 1 drops every label: the model would never see a class. Use 0.1 (guidance) "
                         "or 0 (no guidance); for an unconditional model pass --num-classes none")
    if cfg.resume and cfg.init_from:
        raise ValueError("--resume continues a run with its own weights; --init-from starts a new one from another "
                         "run's: give one of the two")
    if not -10 <= cfg.t_mu <= 10 or (cfg.t_mu and cfg.t_schedule != "logit-normal"):
        raise ValueError(f"--t-mu {cfg.t_mu} shifts the logit-normal training times: give a finite value in [-10, 10] "
                         "with --t-schedule logit-normal, or --t-mu 0")
    if cfg.objective == "meanflow" and cfg.t_grid:
        raise ValueError("--t-grid (k-step distillation) trains a velocity at k times; --objective meanflow "
                         "trains average velocities: use one of the two")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    for f in fields(cfg):  # inf passes the bounds above, and a run would only meet it as a NaN loss
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise ValueError(f"{flag(f.name)} must be a finite number, got {getattr(cfg, f.name)}")


def output_folders(cfg: TrainConfig) -> list[tuple[Path, str]]:
    """The folders a run writes into, each with the flag that names it."""
    return [(Path(cfg.out_dir), "--out-dir"), (output_path(cfg.out, cfg.out_dir).parent, "--out"),
            (output_path(cfg.sample_dir, cfg.out_dir), "--sample-dir")]


def check_outputs(cfg: TrainConfig) -> None:
    """Every output path usable, and --existing refuse honoured: checks only, nothing is created or moved (check_run
    calls it, before any data is read)."""
    checkpoint = output_path(cfg.out, cfg.out_dir)
    if checkpoint.is_dir():
        raise ValueError(f"--out {checkpoint} is a folder: give a file path (e.g. {checkpoint}/best.pth)")
    for folder, name in output_folders(cfg):
        check_writable(folder, name)
    if not cfg.resume and cfg.existing == "refuse":
        keep_earlier_run(Path(cfg.out_dir), checkpoint, "refuse")  # raises where another run's files are there


def make_room(cfg: TrainConfig) -> str | None:
    """The last step before a run starts, after every check: move another run's files in --out-dir aside (a fresh run)
    and create the output folders; returns what was moved. For the main process only: no other rank writes files."""
    moved = None if cfg.resume else keep_earlier_run(Path(cfg.out_dir), output_path(cfg.out, cfg.out_dir), cfg.existing)
    for folder, _ in output_folders(cfg):
        folder.mkdir(parents=True, exist_ok=True)
    return moved
