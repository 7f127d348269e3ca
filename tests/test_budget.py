"""--time-budget / --time-limit: the horizon that fits a budget (known answers), and whole runs on a fake clock
where a step takes 1 s and an epoch end 5 s: they end where the budget does, mid-epoch if need be, and resume
exactly; a limit that the planned epochs fit changes nothing."""
import json

import pytest

import budget
import trainer
from budget import fit_horizon
from checkpoint import load_checkpoint
from helpers import TINY, assert_same_weights, blobs, fit, tiny_config


@pytest.mark.parametrize("step,elapsed,step_s,end_s,budget_s,expected", [
    (10, 15, 1.0, 5.0, 60, 40),  # 45 s left: 30 steps + 3 epoch ends, at an epoch boundary
    (10, 15, 1.0, 5.0, 67, 42),  # 52 s left: 2 steps into a 4th epoch, whose end is paid too
    (10, 15, 1.0, 0.0, 60, 55),  # free epoch ends: every second left is a step
    (0, 0, 0.5, 2.0, 100, 140),  # 70 s of steps + 14 ends of 2 s
    (10, 15, 1.0, 5.0, 10, 10),  # over budget at an epoch boundary: stop now
    (12, 15, 1.0, 5.0, 16, 12),  # over budget mid-epoch: stop now (that epoch's end still runs)
])
def test_fit_horizon_is_the_last_step_that_fits(step, elapsed, step_s, end_s, budget_s, expected):
    horizon = fit_horizon(step, elapsed, step_s, end_s, 10, budget_s)
    cost = lambda h: (h - step) * step_s + (-(-h // 10) - step // 10) * end_s
    assert horizon >= step
    if cost(step) <= budget_s - elapsed:
        assert cost(horizon) <= budget_s - elapsed < cost(horizon + 1)
    assert horizon == expected


class FakeClock:
    """Seconds that pass only when the run takes a step (1 s) or ends an epoch (5 s)."""

    def __init__(self):
        self.now = 0.0
        self.step_s = 1.0
        self.slow_ends: dict[int, float] = {}  # step -> seconds of an epoch end that takes longer than 5 s

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(budget, "now", fake)
    step, end = trainer.train_step, trainer.end_epoch

    def timed_step(*args, **kwargs):
        fake.now += fake.step_s
        return step(*args, **kwargs)

    def timed_end(run, epoch, *args):
        fake.now += fake.slow_ends.get(epoch.step, 5.0)
        return end(run, epoch, *args)

    monkeypatch.setattr(trainer, "train_step", timed_step)
    monkeypatch.setattr(trainer, "end_epoch", timed_end)
    return fake


def budget_run(tmp_path, **overrides) -> dict:
    """96 images in batches of 16 = 6 steps per epoch, with a 63 s budget; --epochs 2 is replaced by the budget."""
    cfg = tiny_config(tmp_path, time_budget=63 / 60, lr_schedule="cosine", **overrides)
    return fit(cfg, TINY, blobs(), blobs(32, seed=1))


def test_a_budget_run_ends_where_the_budget_does_with_the_lr_at_zero(tmp_path, clock):
    summary = budget_run(tmp_path)
    # the largest H with 1 s x H + 5 s x (epoch ends up to H) <= 63 s: H = 33, half-way into a 6th epoch
    assert summary["step"] == 33 and clock.now == 63.0
    last = load_checkpoint(tmp_path / "ck" / "last.pth")
    assert (last["step"], last["epoch"], last["schedule_steps"], last["horizon_fitted"]) == (33, 6, 33, True)
    assert (tmp_path / "ck" / "epoch_6.pth").is_file() and (tmp_path / "samples" / "epoch_6.png").is_file()
    assert (tmp_path / "best.pth").is_file()
    records = [json.loads(line) for line in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3, 4, 5, 6]
    lrs = [r["lr"] for r in records if r["kind"] == "step"]
    assert lrs[-1] < 0.02 * 2e-3 < lrs[len(lrs) // 2]  # the cosine reaches ~0 at the fitted end, not at --epochs 2


def test_a_budget_run_resumes_exactly_with_its_fitted_end(tmp_path, clock):
    whole = budget_run(tmp_path / "whole")
    budget_run(tmp_path / "cut", max_steps=20)  # stops mid-epoch, after the horizon was fitted
    assert load_checkpoint(tmp_path / "cut" / "ck" / "last.pth")["schedule_steps"] == 33
    clock.now += 1000  # the resumed run keeps the planned end whatever the clock says
    resumed = budget_run(tmp_path / "cut", resume="auto")
    assert resumed["step"] == whole["step"] == 33
    assert_same_weights(load_checkpoint(tmp_path / "whole" / "ck" / "last.pth"),
                        load_checkpoint(tmp_path / "cut" / "ck" / "last.pth"))


def test_an_epoch_end_that_spends_the_budget_stops_the_run_there(tmp_path, clock, capsys):
    clock.slow_ends[18] = 40.0  # at 18 + 2 x 5 + 40 = 68 s the 63 s are gone
    summary = budget_run(tmp_path, sample_every=2)
    assert summary["step"] == 18 and clock.now == 68.0
    assert "time budget spent at step 18, before the planned end at 33: stopping" in capsys.readouterr().out
    # epoch 3 is not a grid's turn, but it is the run's last epoch: it draws one
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["epoch_2.png", "epoch_3.png"]
    assert load_checkpoint(tmp_path / "ck" / "last.pth")["schedule_steps"] == 33  # the plan, which a resume finishes


def test_the_last_epoch_end_of_max_steps_draws_one_grid_and_refits_nothing(tmp_path, clock, monkeypatch, capsys):
    drawn, draw = [], trainer.draw_epoch_grid
    monkeypatch.setattr(trainer, "draw_epoch_grid", lambda run, step, log: (drawn.append(step), draw(run, step, log)))
    clock.slow_ends[18] = 40.0  # the budget is spent at the epoch end where --max-steps ends the run anyway
    budget_run(tmp_path, sample_every=2, max_steps=18)
    assert drawn == [12, 18]
    assert "time budget spent" not in capsys.readouterr().out


def test_steps_too_slow_to_calibrate_within_the_budget_are_fitted_sooner(tmp_path, clock, capsys):
    # 5 s steps, 25 per epoch, 60 s: the 23 steps of a full calibration alone would take 115 s
    clock.step_s = 5.0
    summary = fit(tiny_config(tmp_path, time_budget=1, log_every=1), TINY, blobs(400), blobs(32, seed=1))
    assert 2 <= summary["step"] < 23 and clock.now <= 60
    assert load_checkpoint(tmp_path / "ck" / "last.pth")["horizon_fitted"]
    # the epoch end, estimated from its forward passes at ~32 s, is over a quarter of the 60 s
    hint = "a lower --val-size or --val-t-points or a higher --sample-every leaves more of it to training"
    assert hint in capsys.readouterr().out


@pytest.mark.parametrize("fit_early,first_fit", [(True, 3), (False, 23)], ids=["one-process", "ddp"])
def test_slow_steps_end_the_calibration_early_only_where_no_other_rank_must_agree(monkeypatch, fit_early, first_fit):
    now = [0.0]
    monkeypatch.setattr(budget, "now", lambda: now[0])
    timing = budget.Deadline(1, 0, 1, fit_early=fit_early)  # 60 s: a quarter is three 5 s steps
    for step in range(1, 30):
        now[0] += 5.0
        if timing.step_done():
            break
    assert step == first_fit  # under DDP: after the 3 untimed + 20 timed steps that every rank counts alike


def step_lrs(tmp_path) -> list[float]:
    records = [json.loads(line) for line in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if r["kind"] == "step"]


def test_a_time_limit_that_the_planned_epochs_fit_changes_nothing(tmp_path, clock):
    # 5 epochs of 6 steps: 30 x 1 s + 5 ends x 5 s = 55 s, inside a 60 s limit
    limited = fit(tiny_config(tmp_path / "limited", epochs=5, time_limit=1, lr_schedule="cosine"), TINY, blobs(),
                    blobs(32, seed=1))
    plain = fit(tiny_config(tmp_path / "plain", epochs=5, lr_schedule="cosine"), TINY, blobs(), blobs(32, seed=1))
    assert limited["step"] == plain["step"] == 30
    last = load_checkpoint(tmp_path / "limited" / "ck" / "last.pth")
    assert (last["schedule_steps"], last["horizon_fitted"]) == (30, True)
    assert step_lrs(tmp_path / "limited") == step_lrs(tmp_path / "plain")
    assert_same_weights(last, load_checkpoint(tmp_path / "plain" / "ck" / "last.pth"))


@pytest.mark.parametrize("minutes", [dict(time_limit=63 / 60), dict(time_budget=2, time_limit=63 / 60)],
                         ids=["limit", "limit-caps-budget"])
def test_a_time_limit_ends_a_run_that_would_not_fit_it_earlier_with_the_lr_at_zero(tmp_path, clock, capsys, minutes):
    summary = fit(tiny_config(tmp_path, epochs=10, lr_schedule="cosine", **minutes), TINY, blobs(), blobs(32, seed=1))
    assert summary["step"] == 33 and clock.now == 63.0  # as the 63 s budget run above, not the 60 planned steps
    assert load_checkpoint(tmp_path / "ck" / "last.pth")["schedule_steps"] == 33
    lrs = step_lrs(tmp_path)
    assert lrs[-1] < 0.02 * 2e-3 < lrs[len(lrs) // 2]
    assert "time budget 1.05 min" in capsys.readouterr().out
