"""Exported model folders: weights anyone can load, without pickle and without this repo's training state.

    python pretrained.py export --checkpoint checkpoints/flow_matching_mnist.pth --out pretrained/mnist-1rf

A folder holds `model.safetensors` (the EMA weights by default, fp32), `config.json` (the U-Net's config: the
constructor's arguments), `flow_config.json` (recorded sampler, class names, kind and lineage, a training summary,
measured figures) and `README.md`, a model card whose header the Hugging Face Hub reads. The layout is huggingface_hub's
PyTorchModelHubMixin's, so its loader reads a folder as it is, and one uploaded as it is (`hf upload user/repo
FOLDER`) loads with `ConditionalUNet.from_pretrained("user/repo")` (a DiT: `DiT.from_pretrained`). Every loader that
takes a `.pth` takes a folder: `sample_from_checkpoint`, `mnist_test.py --checkpoint`, `evaluate.py`, `reflow.py`,
torch.hub and the notebook.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from checkpoint import (CARD, CONFIG, FLOW_CONFIG, FORMAT, FORMAT_VERSION, WEIGHTS, RunRecord, clean_state_dict,
                        ema_weights, load_checkpoint, sync_folder)
from cli import add_weights_flag, run
from solvers import Sampler

TRAINING_KEYS = ("epoch", "step", "loss", "val_loss", "best_val_loss")  # the summary a card and flow_config.json carry


def export(checkpoint: str | Path | dict, out: str | Path, weights: str = "ema", notes: str = "",
           metrics: dict | None = None, force: bool = False) -> Path:
    """Write an exported folder from a checkpoint (file or dict): weights "ema" or "raw"; notes (Markdown) and measured
    metrics (an `evaluate.py mnist --json` result) go into the card and flow_config.json. Written to a temporary folder
    first and renamed, so a failure leaves no half-written folder; an exported folder is replaced only with force."""
    from safetensors.torch import save_file  # imported here: only exporting and loading folders need it

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be ema or raw, got {weights!r}")
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    state = clean_state_dict(ema_weights(ckpt) if weights == "ema" else ckpt["model_state"])
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "weights": weights,
        "model_config": ckpt["model_config"], **RunRecord.read(ckpt).state(),
        "label_dropout": (ckpt.get("train_config") or {}).get("label_dropout"),  # whether guidance was trained
        "training": {**{k: ckpt.get(k) for k in TRAINING_KEYS}, "train_config": ckpt.get("train_config")},
        "metrics": metrics,
    }
    out = Path(out)
    if out.exists() and not (out / CONFIG).is_file():
        raise ValueError(f"{out} exists and is not an exported model folder: choose another --out")
    if out.exists() and not force:
        raise ValueError(f"{out} holds an exported model already: pass --force to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file({k: v.detach().float().contiguous() for k, v in state.items()}, tmp / WEIGHTS,
                  metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config["model_config"], indent=2) + "\n")
        (tmp / FLOW_CONFIG).write_text(json.dumps({k: v for k, v in config.items() if k != "model_config"},
                                                  indent=2) + "\n")
        (tmp / CARD).write_text(model_card(config, sum(v.numel() for v in state.values()), notes))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 and safetensors 0600: give the usual permissions
        for name in (WEIGHTS, CONFIG, FLOW_CONFIG, CARD):
            os.chmod(tmp / name, 0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sync_folder(out.parent)
    return out


FOLDER = "path/to/this/folder"  # how the card's code names the exported folder


def model_card(config: dict, n_params: int, notes: str = "") -> str:
    """README.md of an exported folder: what the model is, how it was trained, how to load and sample it."""
    cfg, train, sampler = config["model_config"], config["training"], config.get("sampler")
    tc, val = train.get("train_config") or {}, train.get("best_val_loss")
    shift = f" (mu {tc['t_mu']:g})" if tc.get("t_mu") else ""  # the logit-normal shift, where there is one
    classes = config.get("class_names")
    conditioning = (f"class-conditional ({len(classes)} classes: {', '.join(map(str, classes))})" if classes else
                    "class-conditional" if cfg.get("num_classes") else "unconditional")
    sampler_text = f"{Sampler.recorded(sampler)}{'' if sampler else ' (the repo default)'}"
    data = f"datasets: [{config['dataset']}]\n" if config.get("dataset") not in (None, "folder") else ""
    lines = [  # the header is the metadata the Hugging Face Hub reads; the weights are MIT-licensed, as the code
        f"---\nlicense: mit\nlibrary_name: pytorch\n{data}tags: [rectified-flow, flow-matching, {config['kind']}]\n---",
        "",
        f"# {config['kind']} rectified-flow model, {cfg['in_channels']}x{cfg['image_size']}x{cfg['image_size']}",
        "",
        f"A {conditioning} image generator trained with rectified flow matching by Flow Image Generator "
        + ("(t = 0 noise, t = 1 data; MeanFlow: the network predicts the average velocity u(x_t, t, t_end) over "
           "[t, t_end], so one jump x1 = x0 + u(x0, 0, 1) draws an image)." if cfg.get("average_velocity") else
           "(t = 0 noise, t = 1 data; the network predicts v = x1 - x0)."),
        "",
        "| | |", "|---|---|",
        f"| kind | {config['kind']} |",
        f"| parameters | {n_params / 1e6:.2f}M ({config['weights']} weights, fp32) |",
        architecture_row(cfg),
        f"| recorded sampler | {sampler_text} |",
        f"| training | step {train.get('step')}, epoch {train.get('epoch')}, batch {tc.get('batch_size')}, "
        f"lr {tc.get('lr')} ({tc.get('lr_schedule')}), objective {tc.get('objective', 'flow-matching')}, "
        f"t {tc.get('t_schedule', 'uniform')}{shift}, noise {tc.get('coupling', 'independent')}, "
        f"AdamW betas {tc.get('adam_beta1', 0.9)}, {tc.get('adam_beta2', 0.999)}, "
        f"label dropout {config.get('label_dropout')} |",
        f"| validation loss | {f'{val:.4f}' if val is not None and math.isfinite(val) else 'n/a (not validated)'} |",
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
              "", *(["from dit import DiT", f"model = DiT.from_pretrained({FOLDER!r})"]
                    if cfg.get("backbone", "unet") == "dit" else
                    ["from unet import ConditionalUNet", f"model = ConditionalUNet.from_pretrained({FOLDER!r})"]),
              "```", "",
              "The folder loads without pickle (`model.safetensors`, `config.json`, `flow_config.json`); it samples "
              "with the recorded sampler unless told otherwise.", ""]
    lines += measured_section(config.get("metrics"))
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    return "\n".join(lines)


def architecture_row(cfg: dict) -> str:
    """The card's network row: the U-Net's levels, or the DiT's width, depth and patch (older configs: a U-Net)."""
    if cfg.get("backbone", "unet") == "dit":
        return (f"| DiT | width {cfg['base_channels']}, depth {cfg['depth']}, patch {cfg['patch_size']}, "
                f"{cfg['base_channels'] // cfg['head_channels']} heads |")
    return (f"| U-Net | base {cfg['base_channels']} channels, multipliers {tuple(cfg['channel_mult'])}, "
            f"{cfg['num_res_blocks']} res block(s) per level, "
            f"attention at {tuple(cfg['attention_resolutions']) or 'none'} |")


def measured_section(m: dict | None) -> list[str]:
    """The card's "Measured" lines: an Inception FID (photos) or the MNIST readers' figures (digits); none without."""
    if m and "fid" in m:
        return ["## Measured", "", "| sampler | NFE | N | Inception FID | real-vs-real floor | excess |",
                "|---|---|---|---|---|---|",
                f"| {m['solver']} {m['steps']}, w = {m['guidance']} | {m['nfe']} | {m['n']} | {m['fid']:.1f} | "
                f"{m['floor']:.1f} | {m['excess']:.1f} |", "",
                f"`evaluate.py fid` against {m['n_real']} real images of the training folder; the floor is "
                f"{m['n']} other real images of it against the same {m['n_real']} (docs/evaluation.md)"
                + (f"; measured on a {m['hardware']}." if m.get("hardware") else "."), ""]
    if m:
        return ["## Measured", "",
                "| sampler | NFE | N | digit as asked | Fréchet (MNIST-CNN) | real-vs-real floor | excess |",
                "|---|---|---|---|---|---|---|",
                f"| {m['solver']} {m['steps']}, w = {m['guidance']} | {m['nfe']} | {m['n']} | {m['accuracy']:.1%} | "
                f"{m['frechet']:.1f} | {m['floor']:.1f} | {m['excess']:.1f} |", "",
                "Read by `evaluate.py`'s MNIST classifier"
                + (f" ({m['classifier_accuracy']:.2%} on the test split)" if m.get("classifier_accuracy") else "")
                + ", against its class-balanced random reference (docs/evaluation.md)"
                + (f"; measured on a {m['hardware']}." if m.get("hardware") else "."), ""]
    return []


def read_text(path: str, flag: str) -> str:
    """A text file a flag names; ValueError naming the flag when it is missing, a folder, binary or not JSON-able."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path} is not a UTF-8 text file") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="checkpoint (.pth) -> folder: model.safetensors, config.json, "
                       "flow_config.json, README.md")
    e.add_argument("--checkpoint", required=True, help="checkpoint (.pth) to export")
    e.add_argument("--out", required=True, help="folder to write")
    e.add_argument("--force", action="store_true", help="replace --out if it holds an exported model already")
    add_weights_flag(e)
    e.add_argument("--notes", default=None, help="a Markdown file whose text goes into the model card")
    e.add_argument("--metrics", default=None, help="a JSON file of measured figures (evaluate.py mnist --json)")
    args = p.parse_args(argv)
    notes = read_text(args.notes, "--notes") if args.notes else ""
    try:
        metrics = json.loads(read_text(args.metrics, "--metrics")) if args.metrics else None
    except json.JSONDecodeError as e:
        raise ValueError(f"--metrics {args.metrics} is not JSON ({e})") from None
    if metrics is not None and not isinstance(metrics, dict):
        raise ValueError(f"--metrics {args.metrics} holds a JSON {type(metrics).__name__}, not the object that "
                         "`evaluate.py mnist --json` writes")
    out = export(args.checkpoint, args.out, args.weights, notes, metrics, args.force)
    print(f"wrote {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    return out


if __name__ == "__main__":
    run(main)
