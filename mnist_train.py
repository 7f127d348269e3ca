"""Class-conditional rectified-flow training on MNIST at native 28x28 pixels.

    python mnist_train.py                      # preset follows the device: "gpu" on CUDA, else "cpu"
    python mnist_train.py --preset gpu --epochs 5 --batch-size 128
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall shared CPUs

import torch

from cli import parse_configs, run
from data import load_mnist
from sampling import MEANFLOW_SAMPLER, sample_model
from checkpoint import RunRecord
from config import TrainConfig, check_run, run_kind
from flow import MeanFlowConfig, can_guide
from solvers import Sampler
from trainer import train
from unet import ModelConfig


@dataclass
class MNISTData:
    """Where MNIST comes from."""

    data_root: str = "data"  # folder holding MNIST/raw (e.g. ../shared/data)
    download: bool = True  # download MNIST when it is not under DATA_ROOT (needs internet)
    subset: int = 0  # train on the first N images only; 0 = all 60,000
    val_size: int = 2000  # last N training digits, held out for the validation loss (evaluate.py reads the test split)


DEFAULTS = [
    TrainConfig(epochs=20, batch_size=64, lr=1e-4, out_dir="checkpoints/mnist",
                out="checkpoints/flow_matching_mnist.pth"),  # FlowGen's published file name
    ModelConfig(image_size=28, in_channels=1, num_classes=10),
    MNISTData(),
    MeanFlowConfig(),
]

PRESETS = {
    # narrow at 28x28, 48 channels and attention only in the middle at 7x7, no conv after upsampling; 604 steps (4/3
    # epochs) with the LR decaying to 0, AdamW's beta2 0.95, logit-normal t shifted toward the noise, noise paired by
    # optimal transport: the best quality per CPU-minute tried on 2 CPU cores (how chosen: docs/results-mnist.md)
    "cpu": dict(base_channels=16, channel_mult=(1, 2, 3), num_res_blocks=1, attention_resolutions=(), dropout=0.0,
                upsample_conv=False, epochs=1.333, batch_size=128, lr=4e-3, adam_beta2=0.95, warmup_steps=100,
                lr_schedule="cosine", t_schedule="logit-normal", t_mu=-0.5, coupling="ot", val_t_points=4, amp="auto"),
    # ~7.3M parameters, bf16 autocast where the GPU has it
    "gpu": dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(14, 7), dropout=0.1,
                epochs=20, batch_size=128, lr=2e-4, warmup_steps=500, amp="auto", num_workers=2),
}
# the transformer measured against "cpu" at equal minutes, as run: the earlier cpu preset's training (2 epochs, beta2
# 0.999, t unshifted, independent noise) at lr 1e-3 (it trails far there: docs/results-mnist.md)
PRESETS["cpu-dit"] = {**PRESETS["cpu"], "backbone": "dit", "base_channels": 128, "depth": 4, "patch_size": 4,
                      "epochs": 2, "lr": 1e-3, "adam_beta2": 0.999, "t_mu": 0.0, "coupling": "independent"}


def mnist_sampler(model_cfg: ModelConfig, cfg: TrainConfig) -> Sampler:
    """The sampler MNIST checkpoints record: midpoint, 4 steps, w = 1.1 where guidance exists (else 1); mild guidance
    measured better than none on both metrics (docs/sampling.md)."""
    if cfg.objective == "meanflow":
        return MEANFLOW_SAMPLER
    return Sampler(guidance=1.1 if can_guide(model_cfg.num_classes, cfg.label_dropout) else 1.0)


def generate_sample(model: torch.nn.Module, img_size: tuple[int, int, int] = (1, 28, 28), steps: int = Sampler.steps,
                    labels: list[int] | torch.Tensor | None = None, num_samples: int = 1,
                    solver: str = Sampler.solver, guidance: float = Sampler.guidance,
                    seed: int | None = None) -> torch.Tensor:
    """Images (B, *img_size) in [0, 1] from a velocity network; B = len(labels) or num_samples (FlowGen's helper)."""
    cfg = model.config
    if tuple(img_size) != (cfg.in_channels, cfg.image_size, cfg.image_size):
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        raise ValueError(f"img_size {tuple(img_size)} does not match the model's {want}")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    n = len(labels) if labels is not None else num_samples
    return sample_model(model.eval(), n, labels, Sampler(solver, steps, guidance), seed).images


def default_preset() -> str:
    """The preset used when --preset is not given: it follows the device."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, load MNIST, run the shared training loop."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (cfg, model_cfg, data_cfg, meanflow), preset = parse_configs(DEFAULTS, PRESETS, default_preset(), argv, __doc__)
    print(f"preset: {preset}")
    try:  # every setting and output path, before anything is downloaded, created or moved
        run_cfg = check_run(cfg, model_cfg, meanflow)
    except ValueError as e:  # a DiT sized by the U-Net's flags: name the preset that sizes one
        hint = " (--preset cpu-dit sets a DiT that trains on a CPU)" if "DiT" in str(e) else ""
        raise ValueError(f"{e}{hint}") from None
    if model_cfg.in_channels != 1 or model_cfg.num_classes not in (10, None):
        raise ValueError("MNIST has 1 channel and 10 classes: --in-channels must be 1 and --num-classes 10 "
                         "(or none for an unconditional model)")
    if data_cfg.subset < 0 or data_cfg.val_size < 1:
        raise ValueError("--subset must be >= 0 (0 = all) and --val-size >= 1")
    digits = load_mnist(data_cfg.data_root, train=True, image_size=model_cfg.image_size, download=data_cfg.download)
    if data_cfg.val_size >= len(digits):
        raise ValueError(f"--val-size {data_cfg.val_size} leaves none of the {len(digits)} training digits to train on")
    cut = len(digits) - data_cfg.val_size  # the test split stays unseen: it is evaluate.py's reference
    train_set = torch.utils.data.Subset(digits, range(min(data_cfg.subset, cut) if data_cfg.subset else cut))
    val_set = torch.utils.data.Subset(digits, range(cut, len(digits)))
    record = RunRecord(run_kind(cfg), mnist_sampler(model_cfg, cfg).record(), [str(d) for d in range(10)], "mnist",
                       preset=preset, data_root=data_cfg.data_root)
    summary = train(run_cfg, train_set, val_set, record)
    print(f"done: {', '.join(summary['files']) or 'no checkpoint written'} (step {summary['step']}, "
          f"{summary['elapsed_s'] / 60:.1f} min)")
    return summary


if __name__ == "__main__":
    run(main)
