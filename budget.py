"""--time-budget / --time-limit: fit the training run's last step (the LR schedule's horizon) to a wall-clock budget.

The run times its own steps and epoch ends (validation, checkpoint, sample grid), then picks the last
step so that the steps and every epoch end still to come fit in what is left of the budget. It fits
after CALIBRATION_STEPS timed steps (sooner where steps are so slow that those would eat into the budget),
then again at every logged step and epoch end, so that a slower or faster stretch moves the end (and the
learning-rate decay with it) a little, long before it comes.
"""
from __future__ import annotations

import math
import time

SKIP_STEPS = 3  # the run's first steps allocate memory and pick kernels: not timed while later ones exist
CALIBRATION_STEPS = 20  # timed steps before the first fit
CALIBRATION_SHARE = 0.25  # ... or fewer, once the steps have taken this share of the budget (if fit_early)
FORWARD_SHARE = 1 / 3  # an image's forward pass costs about a third of its training step (forward + backward)

clock = time.perf_counter  # a module attribute, so that tests can run the budget on a fake clock


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


class Budget:
    """Wall-clock accounting of one run: time since the start, mean step time, mean epoch-end time."""

    def __init__(self, minutes: float, end_forwards: int, images_per_step: int, *, fit_early: bool):
        """end_forwards: network evaluations of one epoch end (validation and grid), to estimate it until one is timed;
        fit_early: slow steps may end the calibration before CALIBRATION_STEPS. Off under DDP, where each rank times
        its own steps, but all must fit at the same step."""
        self.seconds = 60 * minutes
        self.fit_early = fit_early
        self.end_forwards, self.images_per_step = end_forwards, images_per_step
        self.started = clock()
        self.previous: float | None = None  # when the last step (or the epoch's start) finished
        self.steps, self.step_time = 0, 0.0  # every step of this process
        self.timed, self.timed_time = 0, 0.0  # the steps after SKIP_STEPS
        self.ends, self.end_time = 0, 0.0

    def epoch_started(self) -> None:
        """Start timing the next step here: the epoch end before it is timed apart."""
        self.previous = clock()

    def step_done(self) -> bool:
        """Record a step; True once enough steps are timed to fit the horizon."""
        now = clock()
        seconds, self.previous = now - self.previous, now
        self.steps, self.step_time = self.steps + 1, self.step_time + seconds
        if self.steps > SKIP_STEPS:
            self.timed, self.timed_time = self.timed + 1, self.timed_time + seconds
        return self.timed >= CALIBRATION_STEPS or (self.fit_early and self.step_time >= CALIBRATION_SHARE * self.seconds)

    def end_done(self) -> None:
        """Record an epoch end: the time since the epoch's last step."""
        self.ends, self.end_time = self.ends + 1, self.end_time + clock() - self.previous

    def measures(self) -> tuple[float, float, float]:
        """(elapsed s, s per step, s per epoch end); before any timed end, the end is estimated from its
        forward passes at FORWARD_SHARE of a training image."""
        step_s = self.timed_time / self.timed if self.timed else self.step_time / max(self.steps, 1)
        end_s = (self.end_time / self.ends if self.ends
                 else self.end_forwards * FORWARD_SHARE * step_s / self.images_per_step)
        return clock() - self.started, step_s, end_s
