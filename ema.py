"""Exponential moving average of a model's weights, kept as a frozen copy."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema = decay·ema + (1-decay)·weights after every optimizer step. With warm-up the decay starts small, min(decay,
    (1 + n) / (10 + n)) after n updates, so the average is not dominated by the random initialisation for the first
    ~1/(1-decay) steps."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        """Decay used by the next update()."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights; buffers are copied as they are."""
        decay = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def state_dict(self) -> dict:
        """Weights plus the update count that drives the warm-up."""
        return {"weights": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict(); the decay set at construction is kept."""
        self.model.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])
