"""Tiny models, data and checkpoints that make trainer and sampling tests take seconds."""
import os
import signal
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

from checkpoint import RunRecord, build_model, save_checkpoint
from data import Batch, TensorImages
from ema import EMA
from config import TrainConfig, check_run
from torch.nn.attention import SDPBackend, sdpa_kernel

from unet import ConditionalUNet, ModelConfig

TINY = ModelConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), dropout=0.1, num_classes=3)
TINY_DIT = replace(TINY, backbone="dit", base_channels=16, head_channels=8, patch_size=2, depth=2)
TINY_MNIST = ModelConfig(base_channels=8, num_res_blocks=1, attention_resolutions=(), dropout=0.0)  # 28 px, 10 classes


def blobs(n: int = 96, seed: int = 0) -> TensorImages:
    """Three classes of 8x8 uint8 images: a bright square at a class-specific place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = (torch.rand(n, 8, 8, generator=g) * 40).to(torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 2 * y:2 * y + 3, 2 * y:2 * y + 3] = 255
    return TensorImages(images, labels, 8)


def fit(cfg: TrainConfig, model_cfg: ModelConfig, train_set, val_set=None, record: RunRecord = RunRecord(),
        meanflow=None, match=None) -> dict:
    """trainer.train after config.check_run, as the training scripts call it."""
    import trainer

    return trainer.train(check_run(cfg, model_cfg, meanflow, match), train_set, val_set, record)


def tiny_config(tmp: Path, **overrides) -> TrainConfig:
    """A TrainConfig writing everything under tmp."""
    base = dict(epochs=2, batch_size=16, lr=2e-3, log_every=2, out_dir=str(tmp / "ck"),
                out=str(tmp / "best.pth"),
                sample_dir=str(tmp / "samples"), val_t_points=2, keep_last=0)
    return TrainConfig(**{**base, **overrides})


def tiny_checkpoint(path: Path, cfg: ModelConfig = TINY, label_dropout: float | None = 0.1,
                    seed: int = 0) -> tuple[ConditionalUNet, EMA]:
    """Save a checkpoint without the trainer; returns its raw model and EMA, whose weights differ.

    label_dropout None leaves train_config out, as in checkpoints older than it.
    """
    torch.manual_seed(seed)
    model = build_model(cfg)
    ema = EMA(model)
    with torch.no_grad():  # a fake optimizer step: raw and EMA weights differ, and no zero-initialised layer stays zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ema.update(model)
    state = {"model_state": model.state_dict(), "ema_state": ema.state_dict(),
             "optimizer_state": torch.optim.AdamW(model.parameters()).state_dict(), "model_config": asdict(cfg),
             "epoch": 1, "step": 1, "loss": 1.0}
    if label_dropout is not None:
        state["train_config"] = {"label_dropout": label_dropout}
    save_checkpoint(path, state)
    return model.eval(), ema


def assert_same_weights(a: dict, b: dict) -> None:
    """Raw weights, EMA weights and optimizer moments of two checkpoints are identical."""
    assert a["step"] == b["step"]
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
        assert torch.equal(a["ema_state"]["weights"][key], b["ema_state"]["weights"][key]), key
    for i, state in a["optimizer_state"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name], b["optimizer_state"]["state"][i][name]), (i, name)


@contextmanager
def ctrl_c_at_step(step: int):
    """Within the block, a SIGINT lands inside training step `step` (at its EMA update), as a Ctrl-C would: the trainer
    finishes that step, saves last.pth and stops."""
    import trainer

    original, calls = trainer.EMA.update, []

    def interrupted(self, model):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        original(self, model)

    trainer.EMA.update = interrupted
    try:
        yield
    finally:
        trainer.EMA.update = original


class Field(torch.nn.Module):
    """A closed-form (average) velocity f(x, t, y, t_end) as a model, with the config that the losses read."""

    def __init__(self, f, num_classes: int | None = None):
        super().__init__()
        self.f, self.config = f, ModelConfig(num_classes=num_classes)

    def forward(self, x, t, y=None, t_end=None):
        return self.f(x, t, y, t_end)


def total_derivative(model, x, t, t_end, y, v):
    """(u, du/dt) at x (B, C, H, W), t, t_end (B,): u = model(x, t, y, t_end) and its derivative along dx/dt = v with
    t_end fixed, d/dt u = v·∂_x u + ∂_t u, by one forward-mode JVP with tangent (v, 1) in (x, t): the paper's
    derivative, the oracle that flow.difference_derivative is checked against."""
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels (CPU flash, CUDA) have no forward-mode AD
        return torch.func.jvp(lambda x, t: model(x, t, y, t_end), (x, t), (v, torch.ones_like(t)))


def training_times(cfg: TrainConfig, monkeypatch) -> torch.Tensor:
    """The times (400,) that one flow-matching train_step of the TINY model under cfg draws for its loss."""
    import trainer
    from device import Runtime

    parts, seen, loss = trainer.build(cfg, TINY, Runtime(torch.device("cpu"))), [], trainer.flow_matching_loss
    monkeypatch.setattr(trainer, "flow_matching_loss", lambda *a: (seen.append(a[-1]), loss(*a))[1])
    batch = Batch(torch.zeros(400, 1, 8, 8), torch.zeros(400, dtype=torch.long))
    trainer.train_step(parts, cfg, batch, step=0)
    return seen[0]
