import itertools

import pytest
import torch

from flow import drop_labels, flow_matching_loss, interpolate, ot_noise, sample_t


def test_interpolation_for_known_inputs():
    x0, x1 = torch.full((3, 1, 2, 2), -1.0), torch.full((3, 1, 2, 2), 3.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = interpolate(x0, x1, t)
    assert torch.equal(xt[:, 0, 0, 0], torch.tensor([-1.0, 0.0, 3.0]))  # t=0 noise, t=1 data


def test_loss_target_is_x1_minus_x0(monkeypatch):
    x0, x1 = torch.full((4, 1, 2, 2), -1.0), torch.full((4, 1, 2, 2), 3.0)
    monkeypatch.setattr(torch, "randn_like", lambda x: x0.clone())  # the loss's noise draw, made known

    def velocity(xt, t, y=None):
        assert torch.allclose(xt, interpolate(x0, x1, t))  # the model sees x_t of this very noise
        return x1 - x0

    assert flow_matching_loss(velocity, x1) == 0
    assert flow_matching_loss(lambda xt, t, y=None: x1, x1) == pytest.approx(1.0)  # predicting data: (3 - 4)^2
    assert flow_matching_loss(lambda xt, t, y=None: x0 - x1, x1) == pytest.approx(64.0)  # reversed time: (-4 - 4)^2


class Oracle(torch.nn.Module):
    """Returns the exact target x1 - x0 given x_t, t and the known x1: loss must be 0."""

    def __init__(self, x1):
        super().__init__()
        self.x1 = x1

    def forward(self, xt, t, y=None):
        t = t.view(-1, 1, 1, 1)
        x0 = (xt - t * self.x1) / (1 - t)
        return self.x1 - x0


def test_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    torch.manual_seed(0)
    x1 = torch.randn(64, 1, 4, 4)
    assert flow_matching_loss(Oracle(x1), x1) < 1e-8
    zero = lambda x, t, y=None: torch.zeros_like(x)
    # E|x1 - x0|^2 = Var(x1) + Var(x0) = 2 for standard normal data
    assert flow_matching_loss(zero, x1) == pytest.approx(2.0, rel=0.1)


def test_label_dropout_rate():
    torch.manual_seed(0)
    y = torch.zeros(100_000, dtype=torch.long)
    dropped = (drop_labels(y, 0.1, null_class=10) == 10).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.005)
    assert (drop_labels(y, 0.0, 10) == 0).all()
    assert (drop_labels(y, 1.0, 10) == 10).all()


@pytest.mark.parametrize("p,expected", [(0.0, [0, 1, 2, 1]), (1.0, [3, 3, 3, 3])])
def test_label_dropout_reaches_the_model(p, expected):
    seen = []

    def model(xt, t, y):
        seen.append(y.tolist())
        return torch.zeros_like(xt)

    flow_matching_loss(model, torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 1]), num_classes=3, label_dropout=p)
    assert seen == [expected]  # p = 1: every label is the null token (num_classes); p = 0: none is


def test_timestep_schedules():
    torch.manual_seed(0)
    u, ln = sample_t(50_000, "uniform"), sample_t(50_000, "logit-normal")
    assert 0 <= u.min() and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert ln.mean().item() == pytest.approx(0.5, abs=0.01)
    assert ((ln > 0.25) & (ln < 0.75)).float().mean() > ((u > 0.25) & (u < 0.75)).float().mean() + 0.1  # mid-t heavy
    shifted = sample_t(50_000, "logit-normal", mu=-0.5)  # toward the noise end: its median is sigmoid(-0.5)
    assert shifted.median().item() == pytest.approx(torch.sigmoid(torch.tensor(-0.5)).item(), abs=0.01)
    with pytest.raises(ValueError, match="unknown t schedule"):
        sample_t(3, "cosine")


@pytest.mark.parametrize("y", [torch.arange(12) % 3, None])
def test_ot_noise_is_the_fresh_noise_reordered_within_each_class_at_the_least_total_distance(y):
    x1 = torch.randn(12, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    paired = ot_noise(x1, y)
    torch.manual_seed(0)
    fresh = torch.randn_like(x1)  # the same draw, before pairing
    for index in ([torch.arange(12)] if y is None else [(y == c).nonzero()[:, 0] for c in range(3)]):
        cost = torch.cdist(fresh[index].flatten(1), x1[index].flatten(1)).square()
        if len(index) <= 4:  # a class: every pairing tried
            best = min(cost[list(p), range(len(index))].sum().item() for p in itertools.permutations(range(len(index))))
        else:  # the whole batch: at most the unpaired noise's cost
            best = cost.diagonal().sum().item()
        got = (paired[index] - x1[index]).flatten(1).square().sum().item()
        assert got == pytest.approx(best, rel=1e-5) if len(index) <= 4 else got <= best + 1e-5
        assert sorted(paired[index].flatten().tolist()) == sorted(fresh[index].flatten().tolist())  # a reordering
