"""Rectified-flow training on CelebA or any folder of images, on CPU, one GPU, DataParallel or DDP.

    python rectified_flow_train.py --data-root img_align_celeba            # FlowGen's defaults, 128 px
    python rectified_flow_train.py --preset celeba64 --amp bf16 --compile
    torchrun --nproc_per_node=8 rectified_flow_train.py --preset celeba64   # DDP

From a notebook (importing this module parses no flags and starts nothing):

    from rectified_flow_train import sample_from_checkpoint
    images = sample_from_checkpoint("checkpoints/rf_best.pth", "samples/sample.png", batch_size=16)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall shared CPUs

import torch

from cli import parse_configs, run
from data import image_folder_splits, load_celeba
# sample_from_checkpoint: re-exported, FlowGen's import path
from sampling import MEANFLOW_SAMPLER, sample_from_checkpoint
from checkpoint import RunRecord
from config import TrainConfig, check_run, run_kind
from flow import MeanFlowConfig, can_guide
from solvers import Sampler
from trainer import train
from unet import ModelConfig

__all__ = ["sample_from_checkpoint", "main"]


@dataclass
class FolderData:
    """Where the images come from and how they are split."""

    data_root: str = "img_align_celeba"  # folder searched recursively for jpg/jpeg/png/webp/bmp
    dataset: str = "folder"  # folder | celeba (torchvision's CelebA layout under DATA_ROOT, official splits)
    class_from_folders: bool = False  # class-conditional on the top-level sub-folder names
    val_fraction: float = 0.01  # share of files held out for the validation loss (by file-name hash)
    val_size: int = 2000  # at most this many validation images per epoch


DEFAULTS = [
    TrainConfig(epochs=1000, batch_size=64, lr=1e-5, weight_decay=0.01, warmup_steps=1000, hflip=True, num_workers=4,
                out_dir="checkpoints", out="{out_dir}/rf_best.pth"),
    ModelConfig(image_size=128, in_channels=3, base_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
               attention_resolutions=(16,), dropout=0.1, num_classes=None),
    FolderData(),
    MeanFlowConfig(),
]

PRESETS = {
    "celeba128": {},  # FlowGen's setting: 128 px
    # logit-normal t as small32 measured it on CIFAR-10; untested on a GPU (docs/training.md)
    "celeba64": dict(image_size=64, attention_resolutions=(16, 8), batch_size=128, lr=1e-4, t_schedule="logit-normal"),
    # CPU-sized 32 px: the best FID per CPU-minute measured on the CIFAR-10 folder (docs/results-cifar.md); a grid
    # each epoch (100 photos at 32 NFE) costs 13% of its hour, one every 5 epochs leaves most of that to training
    "small32": dict(image_size=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_resolutions=(8,), dropout=0.0, epochs=20, batch_size=64, lr=2e-3, lr_schedule="cosine",
                    t_schedule="logit-normal", warmup_steps=200, num_workers=2, amp="auto", sample_every=5),
}
# the transformer measured against small32 at equal minutes, as run: small32's training at lr 1e-3, uniform t and a
# grid each epoch (it trails there: docs/results-cifar.md)
PRESETS["dit32"] = {**PRESETS["small32"], "backbone": "dit", "base_channels": 192, "depth": 6, "patch_size": 4,
                    "lr": 1e-3, "t_schedule": "uniform", "sample_every": 1}


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, build the data sets, run the shared training loop."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # no preset: FlowGen's 128 px
    (cfg, model_cfg, data_cfg, meanflow), preset = parse_configs(DEFAULTS, PRESETS, None, argv, __doc__)
    check_data_flags(data_cfg, model_cfg)
    # every setting and output path, before any data is read; the flags say whether the model is class-conditional,
    # the folders later say how many classes
    run_cfg = check_run(cfg, replace(model_cfg, num_classes=1 if data_cfg.class_from_folders else None), meanflow)
    if data_cfg.dataset == "celeba":
        train_set, val_set, class_names = load_celeba(data_cfg.data_root, model_cfg.image_size)
    elif data_cfg.dataset == "folder":
        train_set, val_set, class_names = image_folder_splits(
            data_cfg.data_root, model_cfg.image_size, data_cfg.val_fraction, data_cfg.class_from_folders)

    model_cfg = replace(run_cfg.model, num_classes=len(class_names) if class_names else None)  # the data decides
    if val_set is not None and len(val_set) > data_cfg.val_size:
        val_set = torch.utils.data.Subset(val_set, range(data_cfg.val_size))
    record = RunRecord(run_kind(cfg), folder_sampler(model_cfg, cfg).record(), class_names, data_cfg.dataset,
                       preset=preset, data_root=data_cfg.data_root)
    summary = train(replace(run_cfg, model=model_cfg), train_set, val_set, record)
    print(f"done: {', '.join(summary['files']) or 'no checkpoint written'} (step {summary['step']}, "
          f"{summary['elapsed_s'] / 60:.1f} min)")
    return summary


def folder_sampler(model_cfg: ModelConfig, cfg: TrainConfig) -> Sampler:
    """The sampler photo checkpoints record: Euler, 16 steps, w = 2 where guidance exists (else 1), chosen by
    Inception FID of the 60-minute CIFAR-10 model (docs/results-cifar.md)."""
    if cfg.objective == "meanflow":
        return MEANFLOW_SAMPLER
    return Sampler("euler", 16, 2.0 if can_guide(model_cfg.num_classes, cfg.label_dropout) else 1.0)


def check_data_flags(data_cfg: FolderData, model_cfg: ModelConfig) -> None:
    """Refuse flags that the data overrides or that do nothing with the chosen --dataset."""
    if data_cfg.dataset not in ("folder", "celeba"):
        raise ValueError(f"unknown --dataset {data_cfg.dataset!r}: choose folder or celeba")
    if model_cfg.num_classes is not None:
        raise ValueError("--num-classes is set by the data: use --class-from-folders (one class per sub-folder)")
    if model_cfg.in_channels != 3:
        raise ValueError("images are loaded as RGB: --in-channels must be 3")
    folder_only = data_cfg.class_from_folders or data_cfg.val_fraction != FolderData.val_fraction
    if data_cfg.dataset == "celeba" and folder_only:
        raise ValueError("--class-from-folders and --val-fraction apply to --dataset folder; "
                         "CelebA has no classes here and its own validation split")
    if not 0 <= data_cfg.val_fraction < 1 or not 1 <= data_cfg.val_size <= 1_000_000:
        raise ValueError(f"--val-fraction must lie in [0, 1) and --val-size in 1..1000000 "
                         f"(got {data_cfg.val_fraction}, {data_cfg.val_size})")


if __name__ == "__main__":
    run(main)
