"""The one training loop, shared by mnist_train.py, rectified_flow_train.py and reflow.py: `train` reads top to bottom.

One code path for CPU, one GPU, DataParallel (--parallel dp) and DDP (launched by torchrun, detected from
WORLD_SIZE). Only rank 0 prints and writes files. The random state of a step is derived from (seed, rank, step)
and the data order from (seed, epoch), so a resumed run draws exactly what an uninterrupted one would: resume
needs no saved RNG state.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from budget import Horizon, learning_rate
from checkpoint import (CheckpointError, RunRecord, build_model, check_resume, load_checkpoint, load_ema_weights,
                        publish, restore, save_checkpoint)
from config import RunConfig, TrainConfig, make_room
from cpu import keep_freed_memory
from data import Batch, ShardedSampler
from device import Runtime, StopRequest, global_mean, ignore_sigint, launched_ranks, setup_runtime
from ema import EMA
from flow import (MeanFlowConfig, curriculum_alpha, flow_matching_loss, grid_map_loss, mean_flow_loss,
                  ot_noise, sample_t, validation_loss)
from matching import Critic, critic_for, one_jump
from progress import live_bars
from runlog import RunLog, check_finite, output_path, plot_losses
from sampling import draw_grid, grid_request
from solvers import Sampler
from unet import ModelConfig, VelocityNet


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one optimizer step on one rank: distinct per rank, reproducible on resume."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63


@dataclass
class Parts:
    """What a training step touches."""

    model: VelocityNet  # the plain module: what is saved and averaged
    net: nn.Module  # the model as called: compiled and/or wrapped for DDP / DataParallel
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    rt: Runtime  # where it runs: device, rank, autocast, memory format
    critic: Critic | None = None  # distribution matching's teacher and fake network (RunConfig.match)


def build(cfg: TrainConfig, model_cfg: ModelConfig, rt: Runtime) -> Parts:
    """Model, EMA, optimizer and grad scaler for cfg on rt's device, in rt's memory format."""
    keep_freed_memory()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(model_cfg).to(rt.device, memory_format=rt.memory_format)
    net: nn.Module = torch.compile(model) if rt.compile else model
    if rt.ddp:
        net = rt.distributed(net)
    elif cfg.parallel == "dp":
        net = nn.DataParallel(net)  # on CPU or a single GPU this simply calls the module
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=rt.device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp == "fp16")
    return Parts(model, net, EMA(model, cfg.ema_decay), optimizer, scaler, rt)


def setup(cfg: RunConfig) -> tuple[Runtime, Parts]:
    """The run's one set-up: processes, device and speed settings, then the model and its optimizer (and, with
    distribution matching, its critic)."""
    tc = cfg.train
    rt = setup_runtime(tc.device, tc.parallel, tc.amp, tc.channels_last, tc.compile, tc.deterministic)
    parts = build(tc, cfg.model, rt)
    parts.critic = critic_for(cfg.match, parts.model, rt) if cfg.match else None
    return rt, parts


def train_step(parts: Parts, cfg: TrainConfig, batch: Batch, step: int, lr: float | None = None,
               meanflow: MeanFlowConfig | None = None, alpha: float = 0.0) -> torch.Tensor:
    """One optimizer step on a batch (meanflow: the run's resolve_meanflow; alpha: its α-Flow step); returns the
    loss."""
    rt, (x, y, x0, path) = parts.rt, batch
    torch.manual_seed(step_seed(cfg.seed, rt.rank, step))
    if rt.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg.hflip:  # (refused for pairs: flipping would break the noise-image coupling)
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    if cfg.coupling == "ot":  # (refused for pairs, whose noise is given)
        x0 = ot_noise(x, y)
    for group in parts.optimizer.param_groups:
        group["lr"] = cfg.lr if lr is None else lr
    matching = parts.critic is not None and step >= parts.critic.start  # (the critic comes with grid paths only)
    with rt.autocast():
        if cfg.objective == "meanflow" and path is not None:
            loss = grid_map_loss(parts.net, path, y)
            if matching:  # the jumps' distribution, from fresh noise, beside the paths' regression
                jump = one_jump(parts.net, torch.randn_like(x), y)
                loss = loss + parts.critic.cfg.dm_weight * parts.critic.loss(jump, y)
        elif cfg.objective == "meanflow":  # the target runs on the plain module, the loss through parts.net
            loss = mean_flow_loss(parts.net, x, y, meanflow or MeanFlowConfig(), label_dropout=cfg.label_dropout, x0=x0,
                                  plain=parts.model, alpha=alpha)
        else:
            t = sample_t(len(x), cfg.t_schedule, x.device, cfg.t_grid, cfg.t_mu)
            loss = flow_matching_loss(parts.net, x, y, parts.model.config.num_classes, cfg.label_dropout, x0, t)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.ema.update(parts.model)
    if matching:
        parts.critic.follow(jump, y, rt.autocast)
    return loss.detach()


@dataclass
class Run:
    """What stays fixed through a run: its configs, where it runs, what it trains on and writes."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    meanflow: MeanFlowConfig | None
    rt: Runtime
    parts: Parts
    order: ShardedSampler  # which images each step of each epoch takes, on this rank
    loader: DataLoader
    val_set: Dataset | None
    horizon: Horizon
    record: RunRecord  # what the run is (kind, sampler, class names, lineage): every checkpoint carries it
    sampler: Sampler  # what the epoch ends' sample grids are drawn with: the one the record names

    def say(self, text: str) -> None:
        """A line on rank 0, above the progress bar."""
        if self.rt.main:
            tqdm.write(text)


def prepare(cfg: RunConfig, train_set: Dataset, val_set: Dataset | None, record: RunRecord) -> Run:
    """Set up the checked run: processes and device, model and optimizer, the data order and the planned end."""
    tc = cfg.train
    if getattr(train_set, "paired", False) and (tc.hflip or tc.coupling != "independent"):
        raise ValueError("--hflip and --coupling ot cannot be used with reflow pairs: each image comes with its own "
                         "noise")
    rank, world, _ = launched_ranks()
    per_rank = tc.batch_size // world
    order = ShardedSampler(len(train_set), per_rank, tc.seed, rank, world)
    if order.batches == 0:
        raise ValueError(f"{len(train_set)} training images do not fill one batch of {per_rank} per process: "
                         "lower --batch-size")
    rt, parts = setup(cfg)
    if parts.critic:
        parts.critic.start = cfg.match.dm_start * order.batches
    loader = DataLoader(train_set, batch_size=per_rank, sampler=order, drop_last=True, num_workers=tc.num_workers,
                        pin_memory=rt.device.type == "cuda", persistent_workers=tc.num_workers > 0,
                        worker_init_fn=ignore_sigint)
    planned = math.ceil(tc.epochs * order.batches)  # a fractional last epoch ends inside it
    horizon = Horizon(planned, order.batches, tc.max_steps, tc.time_budget, tc.time_limit)
    return Run(tc, cfg.model, cfg.meanflow, rt, parts, order, loader, val_set, horizon, record,
               Sampler.recorded(record.sampler))


def resume(run: Run) -> tuple[int, float, dict | None]:
    """(step, best validation loss, lineage) of --resume (OUT_DIR/last.pth for auto), or (0, inf, lineage) for a fresh
    run, which --init-from starts from another checkpoint's EMA weights. The lineage is the record's where the script
    knew it (reflow's stages name their pairs too), else the parent's that --init-from or the resumed run names."""
    cfg, parts, lineage = run.cfg, run.parts, run.record.lineage
    path = str(Path(cfg.out_dir) / "last.pth") if cfg.resume == "auto" else cfg.resume
    if not path and cfg.init_from:  # raw and EMA weights both start from its EMA weights, its best estimate
        parent = load_ema_weights(cfg.init_from, run.model_cfg, [parts.model, parts.ema.model], run.rt.device)
        run.say(f"initialised from the EMA weights of {cfg.init_from}")
        return 0, math.inf, lineage or parent
    if not path:
        return 0, math.inf, lineage
    ckpt = load_checkpoint(path, map_location=run.rt.device)
    check_resume(ckpt, run.model_cfg, cfg.batch_size, run.order.batches, run.rt.world, path)
    restore(ckpt, parts.model, parts.ema, parts.optimizer, parts.scaler)
    if parts.critic:
        if "critic_state" not in ckpt:
            raise CheckpointError(f"--resume {path} was trained without distribution matching: resume it without "
                                  "--dm-weight, or start a new run with --init-from")
        parts.critic.load_state_dict(ckpt["critic_state"])
    if run.horizon.restore(ckpt):  # finish the run as it was planned, not a new budget
        run.say(f"time budget: keeping the resumed run's end at step {run.horizon.lr_end}")
    step, batches = ckpt["step"], run.order.batches
    run.say(f"resumed from {path} at step {step} (epoch {step // batches}, {step % batches} steps into the next)")
    if step >= run.horizon.stop:
        run.say(f"nothing to do: that run already reached its end at step {run.horizon.stop} (a longer --epochs or "
                "--max-steps trains on)")
    return step, ckpt.get("best_val_loss", math.inf), lineage or ckpt.get("lineage")


def save_run(run: Run, path: Path, step: int, loss: float, val: float | None, best_val: float) -> None:
    """Write the run's checkpoint at path: enough to resume exactly and to sample."""
    p, configs = run.parts, {**asdict(run.cfg), **(asdict(run.meanflow) if run.meanflow else {})}
    state = {"epoch": math.ceil(step / run.order.batches), "step": step, "loss": loss, "val_loss": val,
             "best_val_loss": best_val, "steps_per_epoch": run.order.batches, "world_size": run.rt.world,
             **run.horizon.state(), "model_state": p.model.state_dict(), "ema_state": p.ema.state_dict(),
             "optimizer_state": p.optimizer.state_dict(), "scaler_state": p.scaler.state_dict(),
             "model_config": asdict(run.model_cfg), "train_config": configs, **run.record.state(),
             **({"critic_state": p.critic.state_dict()} if p.critic else {})}
    save_checkpoint(path, state)


def train(cfg: RunConfig, train_set: Dataset, val_set: Dataset | None = None, record: RunRecord = RunRecord()
          ) -> dict:
    """Train the checked run cfg (config.check_run) on train_set (items (x1, y), or reflow pairs (x1, y, x0, [path]))
    with val_set held out; every checkpoint carries record. Returns a summary."""
    # build: processes, device, model, optimizer, data order, the planned end
    run = prepare(cfg, train_set, val_set, record)
    # resume: weights, optimizer, step and the planned end of an earlier run; the record completed with its parent
    step, best_val, lineage = resume(run)
    run, tc = replace(run, record=replace(record, lineage=lineage)), cfg.train
    if run.rt.main and (moved := make_room(tc)):  # every check passed: only now is another run's folder moved
        run.say(moved)
    conditional = run.model_cfg.num_classes is not None  # an epoch end's network evaluations: grid, validation
    grid = grid_request(run.model_cfg.num_classes)[0] * run.sampler.planned_nfe(conditional) // tc.sample_every
    run.horizon.start(grid + (len(val_set) * tc.val_t_points // run.rt.world if val_set is not None else 0),
                      tc.batch_size // run.rt.world, fit_early=not run.rt.ddp)
    log = open_log(run, step if tc.resume else None)
    start, loss = time.perf_counter(), math.nan
    try:
        with StopRequest() as stop:
            while step < run.horizon.stop:  # the run's one end: Horizon.stop
                # step: the optimizer steps of one epoch, or fewer (the end of the LR schedule, Ctrl-C, --max-steps)
                epoch = run_epoch(run, step, best_val, log, stop)
                step, loss = epoch.step, epoch.loss
                if not epoch.finished:  # inside an epoch: last.pth, for --resume
                    save_last(run, step, loss, best_val, "stopped by --max-steps" if step >= run.horizon.stop
                              else "Ctrl-C")
                    break
                # validate, save, publish, draw: the epoch end
                best_val = end_epoch(run, epoch, best_val, log, start)
                # refit the planned end to the time left, the epoch end's time counted
                spent = run.horizon.epoch_ended(step, run.rt, run.say)
                if spent and run.rt.main and epoch_number(run, step) % tc.sample_every:
                    draw_epoch_grid(run, step, log)  # the time ran out at an epoch without a grid: the run's last one
                if stop.agreed(run.rt):
                    run.say("Ctrl-C: stopped at an epoch end; continue with --resume auto")
                    break
    finally:
        if log:
            log.close()
        if run.rt.ddp:
            dist.destroy_process_group()
    best_path, last = output_path(tc.out, tc.out_dir), Path(tc.out_dir) / "last.pth"
    return {"step": step, "epoch": step // run.order.batches, "loss": loss, "best_val_loss": best_val,
            "checkpoint": str(best_path) if best_path.is_file() else None, "elapsed_s": time.perf_counter() - start,
            "files": [str(p) for p in (best_path, last) if run.rt.main and p.is_file()],
            "model": run.parts.model, "ema": run.parts.ema.model}


def open_log(run: Run, resumed: int | None) -> RunLog | None:
    """Rank 0: OUT_DIR/config.json, the log, and the line that says what is about to train."""
    cfg, rt, parts = run.cfg, run.rt, run.parts
    n_params = sum(p.numel() for p in parts.model.parameters())
    budgeted = run.horizon.deadline is not None
    run.say(f"training {n_params / 1e6:.2f}M parameters on {rt.device} x{rt.world}, {run.order.size} images, "
            f"{run.order.batches} steps/epoch, batch {cfg.batch_size}, "
            f"{f'for {cfg.time_budget:g} min' if budgeted and cfg.time_budget else f'until step {run.horizon.stop}'}"
            f"{f' (at most {cfg.time_limit:g} min)' if budgeted and cfg.time_limit else ''}; autocast {rt.amp}, "
            f"{'channels_last' if rt.channels_last else 'NCHW'}, lr {cfg.lr:g} {cfg.lr_schedule}")
    meanflow = {"meanflow": asdict(run.meanflow)} if run.meanflow else {}
    config = {"train": asdict(cfg), **meanflow, "model": asdict(run.model_cfg), **run.record.state()}
    return RunLog(Path(cfg.out_dir), resumed, cfg.logger, config) if rt.main else None


class Epoch(NamedTuple):
    """What one pass of run_epoch did: the step it ended at, its mean loss over all ranks, its seconds and steps, and
    whether it reached the epoch's end or the LR schedule's (else it stopped inside it: Ctrl-C or --max-steps)."""

    step: int
    loss: float
    seconds: float
    steps: int
    finished: bool


def run_epoch(run: Run, step: int, best_val: float, log: RunLog | None, stop: StopRequest) -> Epoch:
    """Optimizer steps from `step` to the epoch's end, the run's end (Horizon.stop) or a Ctrl-C."""
    cfg, rt, parts, horizon = run.cfg, run.rt, run.parts, run.horizon
    first, epoch, conditional = step, step // run.order.batches, run.model_cfg.num_classes is not None
    run.order.set_epoch(epoch, step - epoch * run.order.batches)
    parts.net.train()
    loss_sum, window_start, window_sum = torch.zeros((), device=rt.device), step, 0.0
    first_bad = torch.full((), -1, device=rt.device)  # the first step whose loss was not finite, kept on the device
    last_save, started = time.monotonic(), time.perf_counter()
    curriculum = run.meanflow.mf_curriculum if run.meanflow else 0.0
    live = rt.main and live_bars()  # off a terminal: a plain line per log step instead of a bar
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{horizon.epochs()}", disable=not live, leave=False,
               dynamic_ncols=True)
    for x, y, *pair in bar:
        batch = Batch(*(t.to(rt.device, non_blocking=True) if t is not None else None
                        for t in (x, y if conditional else None, *pair)))  # pairs: their noise, and their paths
        lr, alpha = learning_rate(cfg, step, horizon.lr_end), curriculum_alpha(step / horizon.lr_end, curriculum)
        if parts.critic and step == parts.critic.start:
            horizon.retime()  # distribution matching joins: dearer steps from here, so the end is fitted on these
        loss = train_step(parts, cfg, batch, step, lr, run.meanflow, alpha)
        first_bad = torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, step + 1)
        loss_sum += loss
        step += 1
        log_step = step % cfg.log_every == 0
        if log_step:  # the loop's one host sync (and, under DDP, its collectives: the loss, the stop check)
            total = global_mean(loss_sum, rt)
            check_finite(total, first_bad, window_start, step, run.cfg.out_dir)
            mean, window_start, window_sum = (total - window_sum) / (step - window_start), step, total
            bar.set_postfix(loss=f"{mean:.4f}")
            if not live:
                run.say(f"step {step}/{horizon.stop}  loss {mean:.4f}  lr {lr:.3g}")
            if log:
                log.write({"kind": "step", "step": step, "epoch": epoch, "loss": mean, "lr": lr,
                           **({"mf_alpha": alpha} if curriculum else {})})
        at_epoch_end = step % run.order.batches == 0
        if horizon.step_ended(step, at_epoch_end, log_step, rt, run.say):
            bar.set_description(f"epoch {epoch + 1}/{horizon.epochs()}", refresh=False)
        if at_epoch_end or step >= horizon.stop or stop.agreed(rt, log_step):
            break
        if rt.main and cfg.save_every and time.monotonic() - last_save >= 60 * cfg.save_every:
            mean = loss_sum.item() / (step - first)  # rank 0's share: no collective off the common path
            if math.isfinite(mean):  # (else the next log step stops every rank together)
                save_last(run, step, mean, best_val, "periodic save")
            last_save = time.monotonic()
    bar.close()
    loss = global_mean(loss_sum, rt) / max(step - first, 1)
    check_finite(loss, first_bad, first, step, run.cfg.out_dir)
    return Epoch(step, loss, time.perf_counter() - started, step - first, at_epoch_end or step == horizon.lr_end)


def save_last(run: Run, step: int, loss: float, best_val: float, reason: str) -> None:
    """last.pth in the middle of an epoch: usable for sampling and exact --resume."""
    if run.rt.main:
        path = Path(run.cfg.out_dir) / "last.pth"
        save_run(run, path, step, loss, None, best_val)
        run.say(f"{reason} at step {step}, inside epoch {step // run.order.batches + 1}: saved {path}; "
                "continue with --resume auto")


def epoch_number(run: Run, step: int) -> int:
    """The 1-based epoch that `step` ends or falls in."""
    return math.ceil(step / run.order.batches)


def draw_epoch_grid(run: Run, step: int, log: RunLog | None) -> None:
    """Rank 0: draw the EMA model's sample grid of the epoch that ends at `step` into --sample-dir and the log."""
    path = output_path(run.cfg.sample_dir, run.cfg.out_dir) / f"epoch_{epoch_number(run, step)}.png"
    log.image("samples", draw_grid(run.parts.ema.model, path, run.sampler, run.record.class_names), step)


def end_epoch(run: Run, epoch: Epoch, best_val: float, log: RunLog | None, start: float) -> float:
    """Validate (all ranks), then on rank 0: log, save the epoch, publish last/best, draw a grid, plot; returns the
    best validation loss so far."""
    cfg, rt, ema, step, loss = run.cfg, run.rt, run.parts.ema, epoch.step, epoch.loss
    conditional = run.model_cfg.num_classes is not None
    val = (validation_loss(ema.model, run.val_set, rt, cfg.batch_size // rt.world, cfg.val_t_points, conditional)
           if run.val_set is not None else None)
    improved = (val if val is not None else loss) < best_val
    best_val = (val if val is not None else loss) if improved else best_val
    if rt.main:
        number, out_dir = epoch_number(run, step), Path(cfg.out_dir)
        record = {"kind": "epoch", "epoch": number, "step": step, "loss": loss, "val_loss": val,
                  "images_per_s": epoch.steps * cfg.batch_size / epoch.seconds, "epoch_s": epoch.seconds,
                  "elapsed_s": time.perf_counter() - start, "lr": run.parts.optimizer.param_groups[0]["lr"]}
        log.write(record)
        epoch_path = out_dir / f"epoch_{number}.pth"
        save_run(run, epoch_path, step, loss, val, best_val)
        publish(epoch_path, out_dir / "last.pth")
        if improved or cfg.select_by == "last":
            publish(epoch_path, output_path(cfg.out, cfg.out_dir))
        if cfg.keep_last:
            (out_dir / f"epoch_{number - cfg.keep_last}.pth").unlink(missing_ok=True)
        if number % cfg.sample_every == 0 or step >= run.horizon.stop:  # the run's last epoch always draws one
            draw_epoch_grid(run, step, log)
        plot_losses(out_dir / "log.jsonl", out_dir / "loss.png")
        val_text = f"val {val:.4f}{' (best)' if improved else ''}  " if val is not None else ""
        run.say(f"epoch {number}/{run.horizon.epochs()}  step {step}  loss {loss:.4f}  {val_text}"
                f"{record['images_per_s']:.0f} img/s  elapsed {record['elapsed_s'] / 60:.1f} min")
    if rt.ddp:
        dist.barrier()  # the other ranks wait here, not inside the next step's all-reduce
    return best_val
