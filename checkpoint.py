"""Checkpoint files: one dict that is enough to resume training and to sample.

Keys: the seed's `epoch`, `model_state`, `ema_state`, `optimizer_state`, `loss`, plus `format`,
`format_version`, `step`, `model_config`, `train_config`, `scaler_state`, `val_loss`,
`best_val_loss` and `class_names`. Weights are saved from the unwrapped module, so no
`module.` (DataParallel/DDP) or `_orig_mod.` (torch.compile) prefix reaches disk.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from unet import ConditionalUNet, UNetConfig

FORMAT = "flow-image-generator"
FORMAT_VERSION = 1
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not one of ours."""


def clean_state_dict(state: dict) -> dict:
    """Strip wrapper prefixes so weights from any wrapper load into a plain ConditionalUNet."""
    cleaned = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write atomically and durably: a synced temp file in the same folder, os.replace, then sync the folder.

    Without the fsyncs a power loss can leave a zero-length file renamed over the last good checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def publish(src: str | Path, dst: str | Path) -> None:
    """Atomically make dst a copy of an already written checkpoint (a hard link where possible)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    sync_folder(dst.parent)


def sync_folder(folder: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint (a .pth file, or a folder that pretrained.py exported); raise CheckpointError
    with a readable reason otherwise."""
    path = Path(path)
    if path.is_dir():
        from pretrained import load_folder  # here: pretrained builds on this module

        return load_folder(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: train one first or pass --checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # garbage, or a pickle naming objects that weights-only loading refuses
        if "Unsupported global" not in str(e):
            raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint (UnpicklingError)") from e
        raise CheckpointError(f"{path} holds pickled Python objects, not only tensors, so it was not written by this repo; "
                              "nothing in it was run (weights-only loading refuses them)") from e
    except Exception as e:  # truncated zip, garbage: all mean "not readable"
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or "model_state" not in ckpt:
        raise CheckpointError(f"{path} is not a Flow Image Generator checkpoint (no 'model_state')")
    if "model_config" not in ckpt:
        raise CheckpointError(
            f"{path} has weights but no 'model_config' (a seed-era checkpoint?): build "
            "ConditionalUNet(...) with its original arguments and load ckpt['model_state'] yourself"
        )
    if ckpt.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {ckpt['format_version']}; this code reads <= {FORMAT_VERSION}")
    return ckpt


def model_config_from(ckpt: dict) -> UNetConfig:
    """UNetConfig stored in a checkpoint (lists back to tuples, unknown keys rejected)."""
    known = {f.name for f in fields(UNetConfig)}
    stored = ckpt["model_config"]
    unknown = set(stored) - known
    if unknown:
        raise CheckpointError(f"checkpoint model_config has unknown keys {sorted(unknown)}: written by newer code?")
    return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


def ema_weights(ckpt: dict) -> dict:
    """EMA weights of a checkpoint, whether stored as EMA.state_dict() or as a plain state dict (seed)."""
    ema = ckpt.get("ema_state")
    if ema is None:
        raise CheckpointError("checkpoint has no EMA weights (an export of the raw ones?): sample with use_ema=False")
    return ema["weights"] if "weights" in ema else ema


def model_from_checkpoint(ckpt: dict, use_ema: bool = True) -> ConditionalUNet:
    """Rebuild the U-Net from the stored config and load the EMA (default) or raw weights."""
    model = ConditionalUNet(model_config_from(ckpt))
    if not use_ema and "model_state" not in ckpt:
        raise CheckpointError("this exported folder holds the EMA weights only: sample those (use_ema=True), or "
                              "export the raw ones with --weights raw")
    weights = ema_weights(ckpt) if use_ema else ckpt["model_state"]
    try:
        model.load_state_dict(clean_state_dict(weights))
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match its model_config: {str(e).splitlines()[0]}") from e
    return model.eval()
