"""Where a training run ends and how its learning rate gets there: the LR schedule, and --time-budget / --time-limit,
which fit the run's last step (the schedule's horizon) to a wall-clock budget.

The run times its own steps and epoch ends (validation, checkpoint, sample grid), then picks the last
step so that the steps and every epoch end still to come fit in what is left of the budget. It fits
after CALIBRATION_STEPS timed steps (sooner where steps are so slow that those would eat into the budget),
then again at every logged step and epoch end, so that a slower or faster stretch moves the end (and the
learning-rate decay with it) a little, long before it comes.
"""
from __future__ import annotations

import math
import time

from device import Runtime, global_max

SKIP_STEPS = 3  # the run's first steps allocate memory and pick kernels: not timed while later ones exist
CALIBRATION_STEPS = 20  # timed steps before the first fit
CALIBRATION_SHARE = 0.25  # ... or fewer, once the steps have taken this share of the budget (if fit_early)
FORWARD_SHARE = 1 / 3  # an image's forward pass costs about a third of its training step (forward + backward)
ANNOUNCE_AGAIN = 0.02  # a refitted end is printed again once it moves by more than this share
SLOW_END_SHARE = 0.25  # an epoch end over this share of the budget gets a hint to make it cheaper

LR_SCHEDULES = ("constant", "cosine", "linear")
now = time.perf_counter  # the budget's clock: a module attribute, so that tests can run a run on a fake one


def fit_horizon(step: int, elapsed_s: float, step_s: float, end_s: float, steps_per_epoch: int, budget_s: float) -> int:
    """The last step H >= step such that the steps up to H and the epoch ends they pass (one at each
    epoch boundary, one at H) take at most budget_s - elapsed_s more seconds."""
    left = budget_s - elapsed_s
    ends_done = step // steps_per_epoch

    def fits(horizon: int) -> bool:
        return (horizon - step) * step_s + (math.ceil(horizon / steps_per_epoch) - ends_done) * end_s <= left

    if not fits(step):
        return step  # out of time: end here (the current epoch's end still runs)
    low, high = step, step + max(int(left / max(step_s, 1e-9)), 0)  # fits(low); nothing past high can fit
    while low < high:  # fits() holds on a prefix of [step, high]: bisect for its last element
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def learning_rate(cfg, step: int, total_steps: int) -> float:
    """LR of optimizer step `step` (0-based) under cfg (a TrainConfig): linear warm-up, then constant or decaying
    to 0 at total_steps, the horizon."""
    if step < cfg.warmup_steps or cfg.lr_schedule == "constant":
        return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)


class Deadline:
    """The wall-clock side of a --time-budget / --time-limit: when the run started, its mean step time and its mean
    epoch-end time, and the last step that the time left allows (`fit`)."""

    def __init__(self, minutes: float, end_forwards: int, images_per_step: int, *, fit_early: bool):
        """end_forwards: network evaluations of one epoch end (validation and grid), to estimate it until one is timed;
        fit_early: slow steps may end the calibration before CALIBRATION_STEPS. Off under DDP, where each rank times
        its own steps, but all must fit at the same step."""
        self.seconds = 60 * minutes
        self.fit_early = fit_early
        self.end_forwards, self.images_per_step = end_forwards, images_per_step
        self.started = self.previous = now()  # previous: when the last step or epoch end finished
        self.steps, self.step_time = 0, 0.0  # every step of this process
        self.timed, self.timed_time = 0, 0.0  # the steps after SKIP_STEPS
        self.ends, self.end_time = 0, 0.0

    def step_done(self) -> bool:
        """Record a step; True once enough steps are timed to fit the horizon."""
        time_now = now()
        seconds, self.previous = time_now - self.previous, time_now
        self.steps, self.step_time = self.steps + 1, self.step_time + seconds
        if self.steps > SKIP_STEPS:
            self.timed, self.timed_time = self.timed + 1, self.timed_time + seconds
        early = self.fit_early and self.step_time >= CALIBRATION_SHARE * self.seconds
        return self.timed >= CALIBRATION_STEPS or early

    def retime(self) -> None:
        """Forget the steps timed so far: from here a step costs something else (a term joined the loss)."""
        self.steps, self.step_time, self.timed, self.timed_time = 0, 0.0, 0, 0.0

    def end_done(self) -> None:
        """Record an epoch end: the time since the epoch's last step."""
        time_now = now()
        self.ends, self.end_time, self.previous = self.ends + 1, self.end_time + time_now - self.previous, time_now

    def measures(self, rt: Runtime) -> tuple[float, float, float]:
        """(elapsed s, s per step, s per epoch end) as the slowest rank measures them (every rank must ask at the same
        step); before any timed end, the end is estimated from its forward passes at FORWARD_SHARE of a training
        image."""
        step_s = self.timed_time / self.timed if self.timed else self.step_time / max(self.steps, 1)
        end_s = (self.end_time / self.ends if self.ends
                 else self.end_forwards * FORWARD_SHARE * step_s / self.images_per_step)
        elapsed, step_s, end_s = global_max([now() - self.started, step_s, end_s], rt)
        return elapsed, step_s, end_s


class Horizon:
    """Where the run ends: `lr_end`, the step at which the LR schedule reaches its end, and `stop`, the step training
    stops at (earlier under --max-steps). Without minutes it is the planned epochs; with them it is refitted to the time
    left as the run goes: --time-budget sets it, --time-limit only caps the planned epochs (`cap`)."""

    def __init__(self, planned: int, steps_per_epoch: int, max_steps: int, budget_minutes: float, limit_minutes: float):
        self.steps_per_epoch, self.max_steps = steps_per_epoch, max_steps
        self.minutes = min((m for m in (budget_minutes, limit_minutes) if m), default=0.0)
        self.cap = None if budget_minutes else planned  # --time-limit alone never runs past the planned epochs
        self.deadline: Deadline | None = None  # started with the run, while the end is not fitted yet
        self.fitted = False  # whether lr_end is fitted to the minutes yet
        self.announced: int | None = None  # the fitted end last printed (printed again when it moves)
        self.lr_end = planned

    @property
    def stop(self) -> int:
        """The step training stops at."""
        return min(self.lr_end, self.max_steps) if self.max_steps else self.lr_end

    def start(self, end_forwards: int, images_per_step: int, fit_early: bool) -> None:
        """Start the clock (with minutes, unless a resumed run kept its fitted end)."""
        if self.minutes and not self.fitted:
            self.deadline = Deadline(self.minutes, end_forwards, images_per_step, fit_early=fit_early)

    def step_ended(self, step: int, at_epoch_end: bool, log_step: bool, rt: Runtime, say) -> bool:
        """Time a step; True if it refitted the end: once calibrated, then at log steps (common to all ranks: DDP-safe),
        but not at an epoch's end, which epoch_ended refits with its time counted."""
        refit = bool(self.deadline and self.deadline.step_done() and not at_epoch_end
                     and (not self.fitted or log_step))
        if refit:
            self.refit(step, rt, say)
        return refit

    def retime(self) -> None:
        """The steps change cost from here on: the end is fitted again on the new ones alone, once they are timed."""
        if self.deadline:
            self.deadline.retime()

    def epoch_ended(self, step: int, rt: Runtime, say) -> bool:
        """Time the epoch end just done and refit the end to the time left (not after the run's last end); True if
        that stopped the run here, before its planned end."""
        if self.deadline and (step < self.stop or not self.fitted):
            self.deadline.end_done()
            return self.refit(step, rt, say)
        return False

    def epochs(self) -> str:
        """Epochs the run will train, for progress lines: "?" until a --time-budget is fitted."""
        return "?" if self.cap is None and not self.fitted else str(math.ceil(self.lr_end / self.steps_per_epoch))

    def refit(self, step: int, rt: Runtime, say) -> bool:
        """Move the end to the last step that the time left allows (every rank must call this at the same step); True
        if the time is spent here, before the planned end."""
        elapsed, step_s, end_s = self.deadline.measures(rt)
        horizon = fit_horizon(step, elapsed, step_s, end_s, self.steps_per_epoch, self.deadline.seconds)
        horizon = min(horizon, self.cap) if self.cap is not None else horizon
        spent = self.fitted and horizon == step < self.lr_end  # e.g. an epoch end that ran long
        if spent:
            say(f"time budget spent at step {step}, before the planned end at {self.lr_end}: stopping")
        elif not self.fitted or abs(horizon - self.announced) > ANNOUNCE_AGAIN * self.announced:
            say(f"time budget {self.minutes:g} min: {elapsed / 60:.1f} min used, {step_s:.3f} s/step, "
                f"{end_s:.1f} s per epoch end -> training ends at step {horizon} "
                f"({horizon / self.steps_per_epoch:.2f} epochs)")
            if not self.fitted and end_s > SLOW_END_SHARE * self.deadline.seconds:
                say(f"each epoch end (validation, checkpoint, sample grid) takes ~{end_s:.0f} s, over a quarter of "
                    "the budget: a lower --val-size or --val-t-points or a higher --sample-every leaves more of it to "
                    "training")
            self.fitted, self.announced = True, horizon
        self.lr_end = horizon
        return spent

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run ends where this one planned to."""
        return {"schedule_steps": self.lr_end, "horizon_fitted": self.fitted}

    def restore(self, ckpt: dict) -> bool:
        """Keep a resumed budget run's fitted end instead of fitting a new budget; True if it did."""
        if not (self.minutes and ckpt.get("horizon_fitted")):
            return False
        self.lr_end = self.announced = ckpt["schedule_steps"]
        self.fitted = True
        return True
