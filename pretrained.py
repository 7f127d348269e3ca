"""Exported model folders: weights anyone can load, without pickle and without this repo's training state.

    python pretrained.py export --checkpoint checkpoints/flow_matching_mnist.pth --out pretrained/mnist-1rf

A folder holds `model.safetensors` (the EMA weights by default, fp32), `config.json` (model config, recorded
sampler, class names, kind and lineage, a training summary) and `README.md`, a model card. The layout is
huggingface_hub's PyTorchModelHubMixin's (config.json + model.safetensors), so a folder pushed to the Hub as is
loads with `ConditionalUNet.from_pretrained("user/repo")`. Every loader that takes a `.pth` takes a folder:
`sample_from_checkpoint`, `mnist_test.py --checkpoint`, `evaluate.py`, `reflow.py` and the notebook.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


from checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, clean_state_dict, ema_weights, load_checkpoint, sync_folder

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
# the committed models: what a fresh clone samples before it has trained anything (pretrained/*/README.md)
PRETRAINED = Path(__file__).resolve().parent / "pretrained"
MNIST_TRAINED = "checkpoints/flow_matching_mnist.pth"  # where make train / mnist_train.py put theirs
TRAINING_KEYS = ("epoch", "step", "loss", "val_loss", "best_val_loss")  # the summary a card and config.json carry


def mnist_checkpoint(path: str | Path | None = None, root: Path = Path(".")) -> tuple[Path, str | None]:
    """(checkpoint, note): path when given; else the one make train writes under root, or the committed pretrained
    model while there is none, with a note that says so."""
    if path is not None:
        return Path(path), None
    if (root / MNIST_TRAINED).is_file():
        return root / MNIST_TRAINED, None
    return PRETRAINED / "mnist-1rf", (f"no {root / MNIST_TRAINED} yet (make train writes it): using the committed "
                                      f"model {PRETRAINED / 'mnist-1rf'}")


def resolve(folder_or_repo_id: str | Path) -> Path:
    """A local exported folder, or a Hugging Face Hub repo id downloaded to the local cache (needs huggingface_hub)."""
    if Path(folder_or_repo_id).exists():
        return Path(folder_or_repo_id)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{folder_or_repo_id} is not a local folder; to download it as a Hugging Face Hub repo "
                              "id, pip install huggingface_hub") from None
    return Path(snapshot_download(str(folder_or_repo_id), allow_patterns=[CONFIG, WEIGHTS, CARD]))


def export(checkpoint: str | Path | dict, out: str | Path, weights: str = "ema", notes: str = "",
           metrics: dict | None = None) -> Path:
    """Write an exported folder from a checkpoint (file or dict): weights "ema" or "raw"; notes (Markdown) and
    measured metrics (an `evaluate.py mnist --json` result) go into the card and config.json. Written to a
    temporary folder first and renamed, so a failure leaves no half-written folder."""
    from safetensors.torch import save_file  # imported here: only exporting and loading folders need it

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be ema or raw, got {weights!r}")
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    state = clean_state_dict(ema_weights(ckpt) if weights == "ema" else ckpt["model_state"])
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "weights": weights,
        "model_config": ckpt["model_config"], "sampler": ckpt.get("sampler"), "class_names": ckpt.get("class_names"),
        "kind": ckpt.get("kind", "1-rectified"), "lineage": ckpt.get("lineage"),
        "label_dropout": (ckpt.get("train_config") or {}).get("label_dropout"),  # whether guidance was trained
        "training": {**{k: ckpt.get(k) for k in TRAINING_KEYS}, "train_config": ckpt.get("train_config")},
        "metrics": metrics,
    }
    out = Path(out)
    if out.exists() and not (out / CONFIG).is_file():
        raise ValueError(f"{out} exists and is not an exported model folder: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file({k: v.detach().float().contiguous() for k, v in state.items()}, tmp / WEIGHTS,
                  metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(config, sum(v.numel() for v in state.values()), notes))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 and safetensors 0600: give the usual permissions
        for name in (WEIGHTS, CONFIG, CARD):
            os.chmod(tmp / name, 0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sync_folder(out.parent)
    return out


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
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / CONFIG} is not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model_config" not in config:
        raise CheckpointError(f"{folder / CONFIG} is not a Flow Image Generator model config (no format "
                              f"{FORMAT!r} and model_config)")
    if config.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} has format version {config['format_version']}; this code reads <= {FORMAT_VERSION}")
    try:
        state = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / WEIGHTS} is truncated or not a safetensors file ({e})") from e
    ckpt = {k: config.get(k) for k in ("model_config", "class_names", "kind", "lineage")}
    ckpt.update({k: v for k, v in config["training"].items() if k != "train_config"})
    ckpt["train_config"] = {"label_dropout": config.get("label_dropout")}
    if config.get("sampler"):
        ckpt["sampler"] = config["sampler"]
    ckpt["ema_state" if config.get("weights", "ema") == "ema" else "model_state"] = (
        {"weights": state} if config.get("weights", "ema") == "ema" else state)
    ckpt["exported"] = config.get("weights", "ema")
    return ckpt


def model_card(config: dict, n_params: int, notes: str = "") -> str:
    """README.md of an exported folder: what the model is, how it was trained, how to load and sample it."""
    cfg, train, sampler = config["model_config"], config["training"], config.get("sampler") or {}
    tc, val = train.get("train_config") or {}, train.get("best_val_loss")
    classes = config.get("class_names")
    conditioning = (f"class-conditional ({len(classes)} classes: {', '.join(map(str, classes))})" if classes else
                    "class-conditional" if cfg.get("num_classes") else "unconditional")
    sampler_text = (f"{sampler['solver']}, {sampler['steps']} step(s), guidance w = {sampler['guidance']}"
                    if sampler else "midpoint, 4 steps, w = 1 (the repo's default)")
    lines = [
        f"# {config['kind']} rectified-flow model, {cfg['in_channels']}x{cfg['image_size']}x{cfg['image_size']}",
        "",
        f"A {conditioning} image generator trained with rectified flow matching by Flow Image Generator "
        "(t = 0 noise, t = 1 data; the network predicts v = x1 - x0).",
        "",
        "| | |", "|---|---|",
        f"| kind | {config['kind']} |",
        f"| parameters | {n_params / 1e6:.2f}M ({config['weights']} weights, fp32) |",
        f"| U-Net | base {cfg['base_channels']} channels, multipliers {tuple(cfg['channel_mult'])}, "
        f"{cfg['num_res_blocks']} res block(s) per level, attention at {tuple(cfg['attention_resolutions']) or 'none'} |",
        f"| recorded sampler | {sampler_text} |",
        f"| training | step {train.get('step')}, epoch {train.get('epoch')}, batch {tc.get('batch_size')}, "
        f"lr {tc.get('lr')} ({tc.get('lr_schedule')}), objective {tc.get('objective', 'flow-matching')}, "
        f"label dropout {config.get('label_dropout')} |",
        f"| validation loss | {'n/a' if val is None else f'{val:.4f}'} |",
    ]
    if config.get("lineage"):
        lines.append(f"| lineage | from a {config['lineage'].get('parent_kind')} parent "
                     f"(sha256 {str(config['lineage'].get('parent_sha256'))[:12]}...) |")
    lines += ["", "## Use", "", "```python",
              "from rectified_flow_train import sample_from_checkpoint   # in a clone of the repo",
              "",
              'images = sample_from_checkpoint("path/to/this/folder", labels=[0, 1, 2])  # (3, C, H, W) in [0, 1]'
              if classes or cfg.get("num_classes") else
              'images = sample_from_checkpoint("path/to/this/folder", batch_size=4)  # (4, C, H, W) in [0, 1]',
              "", "from unet import ConditionalUNet", 'model = ConditionalUNet.from_pretrained("path/to/this/folder")',
              "```", "",
              "The folder loads without pickle (`model.safetensors` + `config.json`); it samples with the recorded sampler "
              "unless told otherwise.", ""]
    m = config.get("metrics")
    if m:
        lines += ["## Measured", "", "| sampler | NFE | N | digit as asked | Fréchet (MNIST-CNN) | real-vs-real floor | excess |",
                  "|---|---|---|---|---|---|---|",
                  f"| {m['solver']} {m['steps']}, w = {m['guidance']} | {m['nfe']} | {m['n']} | {m['accuracy']:.1%} | "
                  f"{m['frechet']:.1f} | {m['floor']:.1f} | {m['excess']:.1f} |", "",
                  "Read by `evaluate.py`'s MNIST classifier"
                  + (f" ({m['classifier_accuracy']:.2%} on the test split)" if m.get("classifier_accuracy") else "")
                  + ", against its class-balanced random reference (docs/evaluation.md)"
                  + (f"; measured on a {m['hardware']}." if m.get("hardware") else "."), ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="checkpoint (.pth) -> folder: model.safetensors, config.json, README.md")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True, help="folder to write (replaced if it is an exported folder already)")
    e.add_argument("--weights", choices=("ema", "raw"), default="ema")
    e.add_argument("--notes", default=None, help="a Markdown file whose text goes into the model card")
    e.add_argument("--metrics", default=None, help="a JSON file of measured figures (evaluate.py mnist --json)")
    args = p.parse_args(argv)
    notes = Path(args.notes).read_text() if args.notes else ""
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    out = export(args.checkpoint, args.out, args.weights, notes, metrics)
    print(f"wrote {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
