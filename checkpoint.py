"""Reading models: checkpoint files (one dict that is enough to resume training and to sample) and the folders
that pretrained.py exports, both into that dict; writing checkpoints atomically; the checks of a resume.

Keys: FlowGen's `epoch`, `model_state`, `ema_state`, `optimizer_state`, `loss`, plus `format`,
`format_version`, `step`, `model_config`, `train_config`, `scaler_state`, `val_loss`,
`best_val_loss` and the run record's (`RunRecord`: `kind`, `sampler`, FlowGen's `class_names`, ...). Weights are
saved from the unwrapped module, so no `module.` (DataParallel/DDP) or `_orig_mod.` (torch.compile) prefix reaches
disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from dit import DiT
from unet import CONFIG, WEIGHTS, ConditionalUNet, ModelConfig, VelocityNet, config_from_dict

FORMAT = "flow-image-generator"
FORMAT_VERSION = 1
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# an exported folder's other files: what this repo records beside config.json (the U-Net's config), and the card
FLOW_CONFIG, CARD = "flow_config.json", "README.md"
# the committed models: what a fresh clone samples before it has trained anything (pretrained/*/README.md)
PRETRAINED = Path(__file__).resolve().parent / "pretrained"
MNIST_TRAINED = "checkpoints/flow_matching_mnist.pth"  # where make train / mnist_train.py put theirs


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not one of ours."""


@dataclass(frozen=True)
class RunRecord:
    """What a run is beyond its configs, made once per run by the script that trains: every checkpoint and exported
    folder carries its fields as top-level keys, and the one loader reads them back (older files lack some: None)."""

    kind: str = "1-rectified"  # n-rectified | distilled-k | meanflow (check_kind)
    sampler: dict | None = None  # the sampler to draw with (solvers.Sampler.record()); None: the repo default
    class_names: list[str] | None = None  # class i's name (FlowGen's key); None: class indices only
    dataset: str | None = None  # mnist | folder | celeba | reflow-pairs: what the images are
    lineage: dict | None = None  # the weights the run started from (parent, parent_sha256, parent_kind), pairs, teacher
    preset: str | None = None  # the training script's --preset
    data_root: str | None = None  # where the training images were read

    @classmethod
    def read(cls, ckpt: dict) -> RunRecord:
        """The record of a checkpoint's (or exported folder's) dict."""
        return cls(**{f.name: ckpt[f.name] for f in fields(cls) if ckpt.get(f.name) is not None})

    def state(self) -> dict:
        """The keys a checkpoint or exported folder stores."""
        return asdict(self)


def clean_state_dict(state: dict) -> dict:
    """Strip wrapper prefixes so weights from any wrapper load into a plain network."""
    cleaned = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write atomically and durably: a synced temp file in the same folder, os.replace, then sync the folder. Without
    the fsyncs a power loss can leave a zero-length file renamed over the last good checkpoint."""
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
        return load_folder(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: check the path (make train writes {MNIST_TRAINED})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # garbage, or a pickle naming objects that weights-only loading refuses
        if "Unsupported global" not in str(e):
            raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                                  "(UnpicklingError)") from e
        raise CheckpointError(f"{path} holds pickled Python objects, not only tensors, so it was not written by this "
                              "repo; nothing in it was run (weights-only loading refuses them)") from e
    except Exception as e:  # truncated zip, garbage: all mean "not readable"
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or "model_state" not in ckpt:
        raise CheckpointError(f"{path} is not a Flow Image Generator checkpoint (no 'model_state')")
    if "model_config" not in ckpt:
        raise CheckpointError(
            f"{path} has weights but no 'model_config' (a FlowGen-era checkpoint?): build "
            "ConditionalUNet(...) with its original arguments and load ckpt['model_state'] yourself"
        )
    check_format_version(ckpt, path)
    return ckpt


def check_format_version(found: dict, source: str | Path) -> None:
    """Refuse a checkpoint or exported folder written by a newer version of this code."""
    if found.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{source} has format version {found['format_version']}; this code reads "
                              f"<= {FORMAT_VERSION}: update this repo (git pull)")


def model_config_from(ckpt: dict) -> ModelConfig:
    """ModelConfig stored in a checkpoint (lists back to tuples, unknown keys rejected)."""
    try:
        return config_from_dict(ckpt["model_config"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint model_config: {e}") from None


def ema_weights(ckpt: dict) -> dict:
    """EMA weights of a checkpoint, whether stored as EMA.state_dict() or as a plain state dict (FlowGen)."""
    ema = ckpt.get("ema_state")
    if ema is None:
        raise CheckpointError("checkpoint has no EMA weights (an export of the raw ones?): sample with use_ema=False")
    return ema["weights"] if "weights" in ema else ema


def build_model(cfg: ModelConfig) -> VelocityNet:
    """The network a model config describes: its backbone, a U-Net or a DiT."""
    return DiT(cfg) if cfg.backbone == "dit" else ConditionalUNet(cfg)


def model_from_checkpoint(ckpt: dict, use_ema: bool = True) -> VelocityNet:
    """Rebuild the model from the stored config and load the EMA (default) or raw weights."""
    model = build_model(model_config_from(ckpt))
    if not use_ema and "model_state" not in ckpt:
        raise CheckpointError("this exported folder holds the EMA weights only: sample those (use_ema=True), or "
                              "export the raw ones with --weights raw")
    weights = ema_weights(ckpt) if use_ema else ckpt["model_state"]
    load_weights(model, clean_state_dict(weights), "checkpoint")
    return model.eval()


def load_weights(model: torch.nn.Module, weights: dict, source: str, strict: bool = True) -> None:
    """model.load_state_dict, with a mismatch between the config and the weights said in one line: which tensor."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} by the config" for k, v in weights.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in weights] if strict else []
    extra = [k for k in weights if k not in own]
    if wrong or missing or extra:
        first = wrong[:1] or [f"{missing[0]} missing from the file"] * bool(missing) or [f"{extra[0]} unexpected"]
        raise CheckpointError(f"{source}: the weights do not match its model config ({len(wrong)} shapes differ, "
                              f"{len(missing)} tensors missing, {len(extra)} unexpected; first: {first[0]})")
    model.load_state_dict(weights, strict=strict)


def load_folder(folder: str | Path) -> dict:
    """An exported folder as the dict load_checkpoint gives (model config, weights, sampler, kind, class names),
    read without pickle; CheckpointError with the reason when a file is missing, truncated or not ours."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not an exported model folder: {name} is missing "
                                  "(make one with `python pretrained.py export`)")
    config = read_json(folder / FLOW_CONFIG) if (folder / FLOW_CONFIG).is_file() else None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{folder} holds no Flow Image Generator model config ({FLOW_CONFIG} with format "
                              f"{FORMAT!r} beside {CONFIG})")
    check_format_version(config, folder)
    config["model_config"] = read_json(folder / CONFIG)  # the U-Net's config alone, as the Hub mixin reads it
    try:
        state = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / WEIGHTS} is truncated or not a safetensors file ({e})") from e
    ckpt = {"model_config": config["model_config"], **RunRecord.read(config).state()}
    model_config_from(ckpt)  # a config.json from another model fails here, with its keys named
    ckpt.update({k: v for k, v in config["training"].items() if k != "train_config"})
    ckpt["train_config"] = {"label_dropout": config.get("label_dropout")}
    weights = config.get("weights", "ema")
    ckpt["ema_state" if weights == "ema" else "model_state"] = {"weights": state} if weights == "ema" else state
    ckpt["exported"] = weights
    return ckpt


def read_json(path: Path) -> dict:
    """A JSON file of an exported folder; CheckpointError when it is not valid JSON."""
    try:
        found = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(found, dict):
        raise CheckpointError(f"{path} holds a JSON {type(found).__name__}, not the object an exported folder has: "
                              "export the model again with `python pretrained.py export`")
    return found


def mnist_checkpoint(path: str | Path | None = None, root: Path = Path(".")) -> tuple[Path, str | None]:
    """(checkpoint, note): path when given; else the one make train writes under root, or the committed pretrained
    model while there is none, with a note that says so."""
    if path is not None:
        return Path(path), None
    if (root / MNIST_TRAINED).is_file():
        return root / MNIST_TRAINED, None
    return PRETRAINED / "mnist-1rf", (f"no {root / MNIST_TRAINED} yet (make train writes it): using the committed "
                                      f"model {PRETRAINED / 'mnist-1rf'}")


def check_same_model(ckpt: dict, model_cfg: ModelConfig, path: str) -> None:
    """The checkpoint must hold the model we are about to train."""
    stored = model_config_from(ckpt)
    if stored != model_cfg:
        diff = [f"{k}: {v} vs {getattr(model_cfg, k)}" for k, v in asdict(stored).items() if getattr(model_cfg, k) != v]
        raise CheckpointError(f"{path} was trained with another model config ({', '.join(diff)}); "
                              "pass the same model flags/preset as that run, or start a new --out-dir")


def check_resume(ckpt: dict, model_cfg: ModelConfig, batch_size: int, steps_per_epoch: int, world: int,
                 path: str) -> None:
    """The checkpoint must hold the model we are about to train, and the same steps per epoch. Another batch size,
    number of processes or training set changes how steps map to epochs and data, so the resumed run would silently
    train on other batches: refused."""
    if "exported" in ckpt:
        raise CheckpointError(f"--resume {path} is an exported folder: it holds the weights alone, not the optimizer "
                              "state and step that resume needs. Resume from a training checkpoint (OUT_DIR/last.pth), "
                              "or start a new run from these weights with --init-from")
    check_same_model(ckpt, model_cfg, path)
    was = {"--batch-size": ckpt.get("train_config", {}).get("batch_size"), "processes": ckpt.get("world_size", 1),
           "steps per epoch": ckpt.get("steps_per_epoch")}
    now = {"--batch-size": batch_size, "processes": world, "steps per epoch": steps_per_epoch}
    diff = [f"{k} {was[k]} then, {now[k]} now" for k in was if was[k] is not None and was[k] != now[k]]
    if diff:
        raise CheckpointError(f"cannot resume {path} exactly: {'; '.join(diff)}. Resume with the same batch size, "
                              "number of processes and data, or start a new --out-dir (with --init-from to keep "
                              "the weights)")


def restore(ckpt: dict, model: torch.nn.Module, ema, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler) -> None:
    """Weights, EMA, optimizer and (when both runs use one) the fp16 grad scaler from a checkpoint."""
    model.load_state_dict(clean_state_dict(ckpt["model_state"]))
    ema.load_state_dict({**ckpt["ema_state"], "weights": clean_state_dict(ckpt["ema_state"]["weights"])})
    optimizer.load_state_dict(ckpt["optimizer_state"])
    if ckpt.get("scaler_state"):  # empty when the run was not fp16: then start with a fresh scaler
        scaler.load_state_dict(ckpt["scaler_state"])


def sha256(path: str | Path) -> str:
    """Hex digest of a checkpoint file, or of an exported folder's weights and configs: a parent in a lineage."""
    digest = hashlib.sha256()
    folder = [Path(path) / name for name in (WEIGHTS, CONFIG, FLOW_CONFIG) if (Path(path) / name).is_file()]
    for file in folder if Path(path).is_dir() else [Path(path)]:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_kind(kind: str | None, path: str | Path) -> str:
    """A checkpoint's kind (none recorded: a first flow), or CheckpointError for one this code does not know."""
    kind = kind or "1-rectified"
    head, _, tail = kind.partition("-")
    if kind != "meanflow" and not (head.isdigit() and tail == "rectified") and not (
            head == "distilled" and tail.isdigit()):
        raise CheckpointError(f"{path} records kind {kind!r}, which this code does not know (n-rectified, "
                              "distilled-k or meanflow): it was written by other code")
    return kind


def load_ema_weights(path: str | Path, model_cfg: ModelConfig, models: list[torch.nn.Module],
                     device: torch.device) -> dict:
    """Load the EMA weights of the checkpoint at path (which must hold model_cfg's model) into each of models; returns
    its lineage entry (path, sha256, kind). A velocity model may start an average-velocity one (meanflow): its
    interval embedding's output layer starts at zero, so that u(x, t, t_end) = v(x, t) exactly at step 0."""
    ckpt = load_checkpoint(path, map_location=device)
    kind = check_kind(ckpt.get("kind"), path)
    stored = model_config_from(ckpt)
    widen = model_cfg.average_velocity and not stored.average_velocity
    check_same_model(ckpt, replace(model_cfg, average_velocity=False) if widen else model_cfg, str(path))
    weights = clean_state_dict(ema_weights(ckpt))
    for model in models:
        load_weights(model, weights, str(path), strict=not widen)  # widened: the interval embedding is left as built
        if widen:
            torch.nn.init.zeros_(model.interval_embed.mlp[-1].weight)
            torch.nn.init.zeros_(model.interval_embed.mlp[-1].bias)
    return {"parent": str(path), "parent_sha256": sha256(path), "parent_kind": kind}
