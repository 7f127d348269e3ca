"""Distribution matching for a one-step model: the gradient on a toy Gaussian (zero when the fake network equals the
teacher, from the fake's clean estimate toward the teacher's otherwise), the one jump, the validation on held-out
paths, a `reflow.py distill --dm-weight` run that records its teacher and resumes bit-exactly, and the refusals."""
from pathlib import Path

import pytest
import torch
from torch import nn

import reflow
from checkpoint import load_checkpoint, sha256
from flow import grid_map_error
from helpers import assert_same_weights, ctrl_c_at_step, tiny_checkpoint
from matching import clean_estimate, distribution_matching_loss, one_jump
from sampling import SampleConfig


class GaussianVelocity(nn.Module):
    """The exact velocity (B, C, H, W) of the flow from N(0, I) noise to data N(mean, std² I): v = (E[x1 | x_t] - x_t) /
    (1 - t), E[x1 | x_t] = mean + t·std² / ((1 - t)² + t²·std²)·(x_t - t·mean)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        t = t.view(-1, 1, 1, 1)
        clean = self.mean + t * self.std**2 / ((1 - t) ** 2 + t**2 * self.std**2) * (x - t * self.mean)
        return (clean - x) / (1 - t)


def test_the_gradient_is_zero_when_the_fake_network_is_the_teacher():
    jump = torch.randn(16, 1, 4, 4, requires_grad=True)
    teacher = GaussianVelocity(1.0, 0.5)
    loss = distribution_matching_loss(jump, teacher, GaussianVelocity(1.0, 0.5), None, torch.rand(16) * 0.9)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(jump.grad) == 0


def test_the_gradient_points_from_the_fakes_clean_estimate_to_the_teachers():
    """Jumps drawn from the fake's N(-1, 0.5²) with the teacher at N(1, 0.5²): descent moves every image toward the
    teacher's clean estimate, and a few steps move the jumps' mean from -1 toward +1."""
    torch.manual_seed(0)
    real, fake = GaussianVelocity(1.0, 0.5), GaussianVelocity(-1.0, 0.5)
    jump = (-1 + 0.5 * torch.randn(64, 1, 4, 4)).requires_grad_(True)
    t = torch.full((64,), 0.5)
    torch.manual_seed(1)
    distribution_matching_loss(jump, real, fake, None, t).backward()
    torch.manual_seed(1)  # the same fresh noise: the clean estimates the loss compared
    xt = 0.5 * torch.randn_like(jump) + 0.5 * jump.detach()
    toward = clean_estimate(real(xt, t), xt, t) - clean_estimate(fake(xt, t), xt, t)
    assert (torch.sign(-jump.grad) == torch.sign(toward)).all()
    images = jump.detach().clone()
    for _ in range(30):
        images.requires_grad_(True)
        distribution_matching_loss(images, real, fake, None, torch.rand(64) * 0.9 + 0.05).backward()
        images = (images - 0.2 * images.numel() * images.grad).detach()  # a step of 0.2 along the direction
    assert images.mean() > -0.5  # from -1, toward the teacher's +1


def test_one_jump_lands_on_noise_plus_the_average_velocity_over_the_whole_interval():
    seen = []

    def net(x, t, y, t_end):
        seen.append((t, t_end))
        return torch.ones_like(x)

    noise = torch.randn(3, 1, 4, 4)
    assert torch.equal(one_jump(net, noise, None), noise + 1)
    assert torch.equal(seen[0][0], torch.zeros(3)) and torch.equal(seen[0][1], torch.ones(3))


def test_the_validation_error_is_zero_on_straight_paths_for_their_velocity():
    x0, d = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    path = torch.stack([x0 + k / 4 * d for k in range(5)], 1)
    assert grid_map_error(lambda x, t, y, t_end: d, path, None).abs().max() < 1e-10
    assert torch.allclose(grid_map_error(lambda x, t, y, t_end: d + 2, path, None), torch.full((5,), 4.0))


def distill(tmp_path: Path, name: str, *extra: str) -> dict:
    flags = ["distill", "--pairs", str(tmp_path / "pairs"), "--val-size", "8", "--objective", "meanflow", "--epochs",
             "1", "--batch-size", "8", "--warmup-steps", "0", "--dm-weight", "0.5", "--out-dir", str(tmp_path / name),
             "--out", str(tmp_path / f"{name}.pth"), "--sample-dir", str(tmp_path / name / "samples"), *extra]
    return reflow.main(flags)


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    parent = tmp_path / "flow.pth"
    tiny_checkpoint(parent)
    reflow.draw_pairs(parent, tmp_path / "pairs", count=40, shard_size=20,
                      sample=SampleConfig(solver="midpoint", steps=4, guidance=1.0), states=True)
    return parent


def test_a_matched_run_records_its_teacher_and_resumes_bit_exactly(tmp_path, pairs):
    summary = distill(tmp_path, "whole", "--init-from", str(pairs))
    last = load_checkpoint(tmp_path / "whole" / "last.pth")
    assert summary["step"] == 4 and last["lineage"]["teacher"] == {"path": str(pairs), "sha256": sha256(pairs)}
    fake = last["critic_state"]["fake"]
    assert any(not torch.equal(fake[k], v) for k, v in load_checkpoint(pairs)["ema_state"]["weights"].items())
    with ctrl_c_at_step(3):
        assert distill(tmp_path, "parts", "--init-from", str(pairs))["step"] == 3
    distill(tmp_path, "parts", "--init-from", str(pairs), "--resume", "auto")
    resumed = load_checkpoint(tmp_path / "parts" / "last.pth")
    assert_same_weights(last, resumed)
    for key, value in fake.items():  # the fake network too, and its optimizer's moments
        assert torch.equal(value, resumed["critic_state"]["fake"][key]), key
    moments = last["critic_state"]["optimizer"]["state"]
    assert all(torch.equal(s["exp_avg_sq"], resumed["critic_state"]["optimizer"]["state"][i]["exp_avg_sq"])
               for i, s in moments.items())


def test_the_term_joins_after_dm_start_epochs_of_regression_alone(tmp_path, pairs):
    distill(tmp_path, "later", "--init-from", str(pairs), "--dm-start", "1")  # one epoch in all: never joins
    fake = load_checkpoint(tmp_path / "later" / "last.pth")["critic_state"]["fake"]
    teacher = load_checkpoint(pairs)["ema_state"]["weights"]
    assert all(torch.equal(fake[k], v) for k, v in teacher.items())


@pytest.mark.parametrize("flags, message", [
    (["--dm-weight", "-1"], "--dm-weight must lie in"),
    (["--dm-fake-steps", "0"], "--dm-fake-steps in 1..100"),
    (["--dm-start", "-1"], "--dm-start in 0..100000"),
    (["--dm-t-min", "0.9", "--dm-t-max", "0.5"], "0 <= min < max <= 1"),
    (["--objective", "flow-matching"], "it needs `reflow.py distill --objective meanflow`"),
])
def test_impossible_matching_settings_are_refused_before_anything_is_written(tmp_path, pairs, flags, message):
    with pytest.raises(ValueError, match=message):
        distill(tmp_path, "bad", "--init-from", str(pairs), *flags)
    assert not (tmp_path / "bad").exists()


def test_a_teacher_of_another_model_is_refused(tmp_path, pairs):
    other = tmp_path / "other.pth"
    from helpers import TINY
    from dataclasses import replace
    tiny_checkpoint(other, replace(TINY, base_channels=16))
    with pytest.raises(ValueError, match="holds another model than the student"):
        distill(tmp_path, "bad", "--init-from", str(pairs), "--dm-teacher", str(other))
