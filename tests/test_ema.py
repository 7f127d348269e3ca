import pytest
import torch

from ema import EMA


def make():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def shift(model, by):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_decay_zero_copies_and_decay_one_freezes():
    model = make()
    copy_ema, frozen = EMA(model, decay=0.0, warmup=False), EMA(model, decay=1.0, warmup=False)
    before = frozen.model.weight.clone()
    shift(model, 1.0)
    copy_ema.update(model)
    frozen.update(model)
    assert torch.equal(copy_ema.model.weight, model.weight)
    assert torch.equal(frozen.model.weight, before)


def test_one_update_is_a_lerp():
    model = make()
    ema = EMA(model, decay=0.9, warmup=False)
    old = ema.model.weight.clone()
    shift(model, 1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, 0.9 * old + 0.1 * model.weight)


def test_warmup_schedule():
    ema = EMA(make(), decay=0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.num_updates += 1
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.num_updates = 100_000
    assert ema.current_decay() == 0.999


def test_state_round_trip_and_frozen_copy():
    model = make()
    ema = EMA(model, decay=0.99)
    shift(model, 0.5)
    for _ in range(5):
        ema.update(model)
    other = EMA(make(), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 5
    assert all(torch.equal(a, b) for a, b in zip(other.model.parameters(), ema.model.parameters()))
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError):
        EMA(model, decay=1.5)
