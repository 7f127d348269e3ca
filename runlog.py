"""The training log: OUT_DIR/config.json and log.jsonl always (the loss plot and resume read it), TensorBoard events
or a Weights & Biases run on request, and the stop on a non-finite loss.

    python mnist_train.py --logger tensorboard     # then: tensorboard --logdir checkpoints/mnist/tensorboard
    python mnist_train.py --logger wandb           # project flow-image-generator or $WANDB_PROJECT; run: OUT_DIR
    WANDB_MODE=offline python mnist_train.py --logger wandb    # no account: OUT_DIR/wandb/, later `wandb sync`
"""
from __future__ import annotations

import json
import math
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LOGGERS = ("jsonl", "tensorboard", "wandb")
SCALARS = {"step": {"loss": "train/loss", "lr": "train/lr"},  # record kind -> {record key: TensorBoard / wandb tag}
           "epoch": {"loss": "epoch/train_loss", "val_loss": "epoch/val_loss", "images_per_s": "epoch/images_per_s"}}


def output_path(template: str, out_dir: str) -> Path:
    """A path flag of a run (--out, --sample-dir) with {out_dir} filled in."""
    return Path(template.replace("{out_dir}", out_dir))


def open_jsonl(path: Path, resume_step: int | None):
    """log.jsonl for appending: a fresh run starts it empty; a resumed run keeps only records up to its step."""
    if resume_step is None or not path.is_file():
        return open(path, "w")
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return open(path, "a")


class TensorBoard:
    """TensorBoard events in folder; a resumed run hides the events after its step (purge_step)."""

    def __init__(self, folder: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked: an optional dependency
        except ImportError:
            raise ValueError("--logger tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step is not None else None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def image(self, tag: str, png: Path, step: int) -> None:
        self.writer.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run named after out_dir, files under out_dir/wandb; a resumed run continues the same run
    (its id is kept in out_dir/wandb_id.txt). WANDB_MODE=offline needs no account."""

    def __init__(self, out_dir: Path, resume_step: int | None, config: dict | None):
        try:
            import wandb  # imported only when asked: an optional dependency
        except ImportError:
            raise ValueError("--logger wandb needs the wandb package: pip install wandb (WANDB_MODE=offline runs "
                             "without an account)") from None
        self.wandb, id_file = wandb, out_dir / "wandb_id.txt"
        resumed = resume_step is not None and id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "flow-image-generator"), name=out_dir.name,
                              dir=str(out_dir), config=config, id=run_id, resume="allow")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, png: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        self.run.finish()


def earlier_run(out_dir: Path, checkpoint: Path) -> list[Path]:
    """The files of another run that a fresh run would replace: its checkpoints and log in out_dir, and checkpoint."""
    found = [out_dir / name for name in ("last.pth", "log.jsonl", "config.json") if (out_dir / name).is_file()]
    return found + sorted(out_dir.glob("epoch_*.pth")) + ([checkpoint] if checkpoint.is_file() else [])


def keep_earlier_run(out_dir: Path, checkpoint: Path, existing: str) -> str | None:
    """Before a fresh run writes anything: move another run's folder aside to OUT_DIR.N and its --checkpoint file (when
    outside it) to NAME.N.pth beside itself, or with existing "refuse" raise ValueError naming the choices; returns
    what was moved, or None."""
    found = earlier_run(out_dir, checkpoint)
    if not found:
        return None
    if existing == "refuse":
        raise ValueError(f"{out_dir} holds an earlier run ({', '.join(p.name for p in found[:4])}"
                         f"{', ...' if len(found) > 4 else ''}): continue it with --resume auto, train into another "
                         "--out-dir, or pass --existing move to keep it as a numbered copy")
    numbered = lambda n: (Path(f"{out_dir}.{n}"), checkpoint.with_name(f"{checkpoint.stem}.{n}{checkpoint.suffix}"))
    n = next(n for n in range(1, 100_000) if not any(p.exists() for p in numbered(n)))
    moves = [(out_dir, numbered(n)[0])] if any(p.parent == out_dir for p in found) else []
    if checkpoint.is_file() and out_dir not in checkpoint.parents:  # inside, it moves with the folder
        moves.append((checkpoint, numbered(n)[1]))
    for src, dst in moves:
        src.rename(dst)
    return f"kept the earlier run: moved {', '.join(f'{src} -> {dst}' for src, dst in moves)}"


def check_writable(folder: Path, flag: str) -> None:
    """folder exists and takes files, or can be created: ValueError naming the flag where a file stands in its path or
    the nearest existing folder refuses writes. Creates nothing: a refused run leaves the disk as it found it."""
    existing = next((p for p in (folder, *folder.absolute().parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        raise ValueError(f"{flag}: {folder} (or a folder above it) is a file: pick another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write into {folder} ({existing} is not writable): pick a writable path")


def check_file_out(path: Path, flag: str) -> None:
    """path can be written as a file: not a folder, and its folder exists and takes files or can be created."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file path inside it")
    check_writable(path.parent, flag)


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved (a ValueError, so the
    scripts print it as one line)."""


def check_finite(loss: float, first_bad: torch.Tensor, since: int, step: int, out_dir: str) -> None:
    """Stop the run, saving nothing more, once a logged loss is NaN or infinite: the weights after it are lost.
    first_bad: the first step whose loss was not finite on this rank, or -1 (then another rank's was)."""
    if math.isfinite(loss):
        return
    bad = int(first_bad)
    where = f"at step {bad}" if bad > 0 else f"on another process, between steps {since + 1} and {step}"
    last = Path(out_dir) / "last.pth"
    kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
    raise TrainingDiverged(f"the training loss became {loss} {where}: stopped, and {kept}. A lower --lr, "
                           "--grad-clip or (meanflow) a lower --mf-share or --mf-weight-power may keep it finite")


class RunLog:
    """Where a training run's records go: OUT_DIR/config.json, JSON lines, and the same scalars and the epoch grids
    to TensorBoard or wandb."""

    def __init__(self, out_dir: Path, resume_step: int | None, logger: str = "jsonl", config: dict | None = None):
        if logger not in LOGGERS:
            raise ValueError(f"unknown --logger {logger!r}: choose one of {', '.join(LOGGERS)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:  # the resolved configs of the run, beside its outputs
            (out_dir / "config.json").write_text(json.dumps(config, indent=2))
        self.sink = (TensorBoard(out_dir / "tensorboard", resume_step) if logger == "tensorboard" else
                     WandB(out_dir, resume_step, config) if logger == "wandb" else None)
        self.jsonl = open_jsonl(out_dir / "log.jsonl", resume_step)

    def write(self, record: dict) -> None:
        """One record ({"kind": "step" | "epoch", "step": ..., ...}) to every log."""
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.sink:
            values = {tag: record[key] for key, tag in SCALARS[record["kind"]].items() if record.get(key) is not None}
            self.sink.scalars(values, record["step"])

    def image(self, tag: str, png: Path, step: int) -> None:
        """A grid PNG that the run wrote, as an image of the run (JSON lines keep only its path on disk)."""
        if self.sink:
            self.sink.image(tag, png, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.sink:
            self.sink.close()


@contextmanager
def figure(path: Path, **subplots):
    """A matplotlib figure (Agg: no display needed) saved to path as a PNG when the block ends: (fig, axes, plt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes, plt
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def plot_losses(log_path: Path, png_path: Path) -> None:
    """Loss curve PNG from log.jsonl: training loss per log interval, validation loss per epoch."""
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "epoch" and r.get("val_loss") is not None]
    with figure(png_path, figsize=(6, 4)) as (_, ax, _):
        if train:
            ax.plot(*zip(*train), label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss (EMA)")
        ax.set(xlabel="optimizer step", ylabel="flow-matching MSE", yscale="log")
        if train or val:  # a run shorter than --log-every without validation has nothing to label
            ax.legend()
