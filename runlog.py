"""The training log: OUT_DIR/log.jsonl always (the loss plot and resume read it), TensorBoard events on request.

    python mnist_train.py --logger tensorboard     # then: tensorboard --logdir checkpoints/mnist/tensorboard
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

LOGGERS = ("jsonl", "tensorboard")
SCALARS = {"step": {"loss": "train/loss", "lr": "train/lr"},  # record kind -> {record key: TensorBoard tag}
           "epoch": {"loss": "epoch/train_loss", "val_loss": "epoch/val_loss", "images_per_s": "epoch/images_per_s"}}


def open_log(path: Path, resume_step: int | None):
    """log.jsonl for appending: a fresh run starts it empty; a resumed run keeps only records up to its step."""
    if resume_step is None or not path.is_file():
        return open(path, "w")
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return open(path, "a")


def tensorboard_writer(folder: Path, resume_step: int | None):
    """A SummaryWriter into folder; a resumed run hides the events after its step (purge_step)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # imported only when asked: an optional dependency
    except ImportError:
        raise ValueError("--logger tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step is not None else None)


class RunLog:
    """Where a training run's records go: JSON lines, and the same scalars plus the epoch grids as TensorBoard events."""

    def __init__(self, out_dir: Path, resume_step: int | None, logger: str = "jsonl"):
        if logger not in LOGGERS:
            raise ValueError(f"unknown --logger {logger!r}: choose one of {', '.join(LOGGERS)}")
        self.tensorboard = tensorboard_writer(out_dir / "tensorboard", resume_step) if logger == "tensorboard" else None
        self.jsonl = open_log(out_dir / "log.jsonl", resume_step)

    def write(self, record: dict) -> None:
        """One record ({"kind": "step" | "epoch", "step": ..., ...}) to every log."""
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard:
            for key, tag in SCALARS[record["kind"]].items():
                if record.get(key) is not None:
                    self.tensorboard.add_scalar(tag, record[key], record["step"])
            self.tensorboard.flush()

    def image(self, tag: str, png: Path, step: int) -> None:
        """A grid PNG that the run wrote, as a TensorBoard image (JSON lines keep only its path on disk)."""
        if self.tensorboard:
            self.tensorboard.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")
            self.tensorboard.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
