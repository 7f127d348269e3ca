"""The one training loop, shared by mnist_train.py and rectified_flow_train.py.

One code path for CPU, one GPU, DataParallel (--parallel dp) and DDP (launched by torchrun,
detected from the RANK variable). Only rank 0 prints and writes files. The random state of a
step is derived from (seed, rank, step), so a resumed run draws exactly what an uninterrupted
one would: resume needs no saved RNG state.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from checkpoint import CheckpointError, clean_state_dict, load_checkpoint, model_config_from, save_checkpoint
from ema import EMA
from flow import T_SCHEDULES, flow_matching_loss, interpolate
from sampling import sample_model, save_grid
from unet import ConditionalUNet, UNetConfig


@dataclass
class TrainConfig:
    """How to train; every field is a command-line flag of both training scripts."""

    epochs: int = 20  # passes over the training set
    batch_size: int = 64  # global batch, split over GPUs / DDP ranks
    lr: float = 1e-4  # AdamW learning rate after warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimizer steps
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # EMA decay (with warm-up), used for sampling and validation
    label_dropout: float = 0.1  # share of labels replaced by the null token (classifier-free guidance)
    t_schedule: str = "uniform"  # training-time distribution: uniform | logit-normal
    hflip: bool = False  # random horizontal flips (not for digits)
    seed: int = 0  # seeds data order, noise, times and dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: str = "auto"  # auto (DDP under torchrun, else one device) | dp (DataParallel) | none
    num_workers: int = 0  # data-loader worker processes
    amp: str = "none"  # autocast: none | bf16 | fp16 | auto (= bf16 where it is faster: CUDA, and CPUs with AMX)
    channels_last: str = "auto"  # NHWC memory layout: on | off | auto (= on, except with bf16 on the CPU; see resolve_speed)
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # deterministic cuDNN kernels (slower); off = cudnn.benchmark
    out_dir: str = "checkpoints"  # epoch_N.pth, last.pth, log.jsonl, loss.png, config.json
    checkpoint: str = "checkpoints/rf_best.pth"  # the checkpoint with the lowest validation loss
    sample_dir: str = "samples"  # one sample grid PNG per epoch
    resume: str = ""  # checkpoint to resume from, or "auto" for OUT_DIR/last.pth
    keep_last: int = 5  # epoch_N.pth files kept on disk; 0 keeps all
    log_every: int = 50  # steps between log.jsonl records and progress-bar updates
    val_t_points: int = 8  # validation loss averages over this fixed grid of t values
    max_steps: int = 0  # stop after this many optimizer steps in total; 0 = no limit


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size."""

    device: torch.device
    rank: int = 0
    world: int = 1
    ddp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


class ShardedSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch), split over ranks, that can start mid-epoch.

    Plays the role of DistributedSampler + set_epoch, and also lets a resumed run skip the
    batches it already trained on without loading them.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.batches = size // world // batch_size  # per rank and epoch; the remainder is dropped
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size

    def __iter__(self):
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = perm[self.rank::self.world][: self.batches * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size:].tolist())


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device; join the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if world == 1 or cfg.parallel == "none":
        return Runtime(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world, ddp=True)


def configure_backends(cfg: TrainConfig) -> None:
    """TF32 and cudnn.benchmark for speed, unless --deterministic."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.backends.cudnn.deterministic = cfg.deterministic
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one optimizer step on one rank: distinct per rank, reproducible on resume."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63


def check_config(cfg: TrainConfig, rt: Runtime) -> None:
    """Reject settings that would fail later, deep inside torch."""
    if cfg.t_schedule not in T_SCHEDULES:
        raise ValueError(f"unknown --t-schedule {cfg.t_schedule!r}: choose one of {', '.join(T_SCHEDULES)}")
    if cfg.amp not in ("none", "bf16", "fp16", "auto"):
        raise ValueError(f"unknown --amp {cfg.amp!r}: choose none, bf16, fp16 or auto")
    if cfg.channels_last not in ("on", "off", "auto"):
        raise ValueError(f"unknown --channels-last {cfg.channels_last!r}: choose on, off or auto")
    if cfg.parallel not in ("auto", "dp", "none"):
        raise ValueError(f"unknown --parallel {cfg.parallel!r}: choose auto, dp or none (DDP: launch with torchrun)")
    if cfg.batch_size < rt.world or cfg.batch_size % rt.world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {rt.world} processes (one batch share each)")
    if rt.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible: use --device cpu")


def check_resume(ckpt: dict, model_cfg: UNetConfig, path: str) -> None:
    """The checkpoint must hold the model we are about to train."""
    stored = model_config_from(ckpt)
    if stored != model_cfg:
        diff = {k: (v, getattr(model_cfg, k)) for k, v in asdict(stored).items() if getattr(model_cfg, k) != v}
        raise CheckpointError(
            f"{path} was trained with another model config ({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in diff.items())}); "
            "pass the same model flags/preset as that run, or start a new --out-dir"
        )


@torch.no_grad()
def validation_loss(model: nn.Module, data: Dataset, rt: Runtime, batch_size: int, t_points: int, conditional: bool) -> float:
    """Mean flow-matching loss on held-out data with fixed noise and a fixed t grid: comparable across epochs."""
    noise_gen = torch.Generator().manual_seed(1234)
    ts = (torch.arange(t_points) + 0.5) / t_points
    total, count = 0.0, 0
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        x = x.to(rt.device)
        y = y.to(rt.device) if conditional else None
        for t in ts:
            x0 = torch.randn(x.shape, generator=noise_gen).to(rt.device)
            tb = t.expand(len(x)).to(rt.device)
            total += F.mse_loss(model(interpolate(x0, x, tb), tb, y), x - x0, reduction="sum").item()
            count += x.numel()
    return total / count


def publish(src: Path, dst: Path) -> None:
    """Atomically make dst a copy of an already written checkpoint (a hard link where possible)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


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
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def cpu_has_amx() -> bool:
    """Intel AMX tiles: they make bf16 autocast on the CPU faster than fp32 (without them it is ~18x slower)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def resolve_speed(cfg: TrainConfig, device: torch.device) -> tuple[str, bool]:
    """The autocast mode and memory layout that --amp and --channels-last give on this device."""
    cpu = device.type == "cpu"
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if (cpu_has_amx() if cpu else torch.cuda.is_bf16_supported()) else "none"
    if cpu and amp == "fp16":
        amp = "none"  # fp16 autocast on the CPU is slower than fp32: a no-op there
    if cfg.channels_last != "auto":
        return amp, cfg.channels_last == "on"
    # NHWC is faster for fp32 on the CPU and on GPUs; but bf16 GroupNorm on the CPU is ~4x slower in NHWC,
    # which makes NCHW the faster layout for the small CPU presets (benchmark.py train-speed).
    return amp, not (cpu and amp == "bf16")


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
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    amp, channels_last = resolve_speed(cfg, rt.device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = ConditionalUNet(model_cfg).to(rt.device, memory_format=memory_format)
    net: nn.Module = torch.compile(model) if cfg.compile else model
    if rt.ddp:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    elif cfg.parallel == "dp":
        net = nn.DataParallel(net)  # on CPU or a single GPU this simply calls the module
    cuda = rt.device.type == "cuda"
    autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "none" else nullcontext())
    return Parts(model, net, EMA(model, cfg.ema_decay),
                 torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda or None),
                 torch.amp.GradScaler(rt.device.type, enabled=amp == "fp16"), autocast, amp, channels_last)


def train_step(parts: Parts, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor | None, step: int, rank: int = 0) -> torch.Tensor:
    """One optimizer step on a batch already on the device (x: (B, C, H, W) in [-1, 1]); returns the loss."""
    torch.manual_seed(step_seed(cfg.seed, rank, step))
    if parts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg.hflip:
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    for group in parts.optimizer.param_groups:
        group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    with parts.autocast:
        loss = flow_matching_loss(parts.net, x, y, parts.model.config.num_classes, cfg.label_dropout, cfg.t_schedule)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.ema.update(parts.model)
    return loss.detach()


def train(
    cfg: TrainConfig,
    model_cfg: UNetConfig,
    train_set: Dataset,
    val_set: Dataset | None = None,
    class_names: list[str] | None = None,
    extra: dict | None = None,
) -> dict:
    """Train a ConditionalUNet with the rectified-flow objective; returns a summary of the run."""
    rt = setup_runtime(cfg)
    check_config(cfg, rt)
    configure_backends(cfg)
    say = print if rt.main else (lambda *a, **k: None)
    out_dir, conditional = Path(cfg.out_dir), model_cfg.num_classes is not None
    parts = build(cfg, model_cfg, rt)
    model, ema, optimizer, scaler = parts.model, parts.ema, parts.optimizer, parts.scaler
    step, best_val = 0, math.inf

    resume = str(out_dir / "last.pth") if cfg.resume == "auto" else cfg.resume
    if resume:
        ckpt = load_checkpoint(resume, map_location=rt.device)
        check_resume(ckpt, model_cfg, resume)
        model.load_state_dict(clean_state_dict(ckpt["model_state"]))
        ema.load_state_dict(ckpt["ema_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        scaler.load_state_dict(ckpt.get("scaler_state") or {})
        step, best_val = ckpt["step"], ckpt.get("best_val_loss", math.inf)
        say(f"resumed from {resume} at step {step} (epoch {ckpt['epoch']})")

    per_rank = cfg.batch_size // rt.world
    sampler = ShardedSampler(len(train_set), per_rank, cfg.seed, rt.rank, rt.world)
    if sampler.batches == 0:
        raise ValueError(f"{len(train_set)} training images do not fill one batch of {per_rank} per process: lower --batch-size")
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=True, num_workers=cfg.num_workers,
                        pin_memory=rt.device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    total_steps = cfg.epochs * sampler.batches
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    def checkpoint_state(epoch: int, loss: float, val: float | None) -> dict:
        return {
            "epoch": epoch, "step": step, "loss": loss, "val_loss": val, "best_val_loss": best_val,
            "model_state": model.state_dict(), "ema_state": ema.state_dict(),
            "optimizer_state": optimizer.state_dict(), "scaler_state": scaler.state_dict(),
            "model_config": asdict(model_cfg), "train_config": asdict(cfg), "class_names": class_names,
            **(extra or {}),
        }

    def save_partial() -> None:
        """last.pth in the middle of an epoch (Ctrl-C, --max-steps): usable for sampling and --resume."""
        if rt.main:
            save_checkpoint(out_dir / "last.pth", checkpoint_state(epoch, epoch_loss, None))
            say(f"stopped at step {step}, inside epoch {epoch + 1}: saved {out_dir / 'last.pth'}; continue with --resume auto")

    if rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({"train": asdict(cfg), "model": asdict(model_cfg), **(extra or {})}, indent=2))
    log_file = open(out_dir / "log.jsonl", "a") if rt.main else None
    n_params = sum(p.numel() for p in model.parameters())
    say(f"training {n_params / 1e6:.2f}M parameters on {rt.device} x{rt.world}, {len(train_set)} images, "
        f"{sampler.batches} steps/epoch, batch {cfg.batch_size}, until step {total_steps}; "
        f"autocast {parts.amp}, {'channels_last' if parts.channels_last else 'NCHW'}")

    start_time, epoch, epoch_loss = time.perf_counter(), step // sampler.batches, math.nan
    try:
        while step < total_steps:
            sampler.set_epoch(epoch, step - epoch * sampler.batches)
            parts.net.train()
            loss_sum, n_loss, window_sum, window_n = torch.zeros((), device=rt.device), 0, 0.0, 0
            epoch_start, epoch_steps = time.perf_counter(), 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not rt.main, leave=False, dynamic_ncols=True)
            for x, y in bar:
                x = x.to(rt.device, non_blocking=True)
                y = y.to(rt.device, non_blocking=True) if conditional else None
                loss = train_step(parts, cfg, x, y, step, rt.rank)
                step, epoch_steps = step + 1, epoch_steps + 1
                loss_sum += loss
                n_loss += 1
                if step % cfg.log_every == 0:  # the only host sync in the loop
                    window = loss_sum.item()
                    mean = (window - window_sum) / (n_loss - window_n)
                    window_sum, window_n = window, n_loss
                    bar.set_postfix(loss=f"{mean:.4f}")
                    if log_file:
                        log_file.write(json.dumps({"kind": "step", "step": step, "epoch": epoch, "loss": mean}) + "\n")
                if step >= total_steps:
                    break
            bar.close()
            seconds = time.perf_counter() - epoch_start
            epoch_loss = loss_sum.item() / max(n_loss, 1)
            if step % sampler.batches:  # --max-steps ended mid-epoch: keep the state, as Ctrl-C does
                save_partial()
                break
            epoch += 1
            if not rt.main:
                continue
            val = validation_loss(ema.model, val_set, rt, per_rank, cfg.val_t_points, conditional) if val_set else None
            improved = (val if val is not None else epoch_loss) < best_val
            if improved:
                best_val = val if val is not None else epoch_loss
            record = {"kind": "epoch", "epoch": epoch, "step": step, "loss": epoch_loss, "val_loss": val,
                      "images_per_s": epoch_steps * cfg.batch_size / seconds, "epoch_s": seconds,
                      "elapsed_s": time.perf_counter() - start_time, "lr": optimizer.param_groups[0]["lr"]}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            epoch_path = out_dir / f"epoch_{epoch}.pth"
            save_checkpoint(epoch_path, checkpoint_state(epoch, epoch_loss, val))
            publish(epoch_path, out_dir / "last.pth")
            if improved:
                publish(epoch_path, Path(cfg.checkpoint))
            if cfg.keep_last:
                (out_dir / f"epoch_{epoch - cfg.keep_last}.pth").unlink(missing_ok=True)
            grid_labels = torch.arange(min(model_cfg.num_classes, 10)).repeat_interleave(10) if conditional else None
            samples = sample_model(ema.model, len(grid_labels) if conditional else 64, grid_labels, seed=0, device=rt.device)
            save_grid(samples.images, Path(cfg.sample_dir) / f"epoch_{epoch}.png", samples.labels, class_names)
            plot_losses(out_dir / "log.jsonl", out_dir / "loss.png")
            val_text = f"val {val:.4f}{' (best)' if improved else ''}  " if val is not None else ""
            say(f"epoch {epoch}/{cfg.epochs}  step {step}  loss {epoch_loss:.4f}  {val_text}"
                f"{record['images_per_s']:.0f} img/s  elapsed {record['elapsed_s'] / 60:.1f} min")
    except KeyboardInterrupt:
        save_partial()
    finally:
        if log_file:
            log_file.close()
        if rt.ddp:
            dist.destroy_process_group()
    return {"step": step, "epoch": epoch, "loss": epoch_loss, "best_val_loss": best_val, "checkpoint": cfg.checkpoint,
            "elapsed_s": time.perf_counter() - start_time, "model": model, "ema": ema.model}
