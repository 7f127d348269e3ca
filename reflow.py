"""Few-step generation: reflow (2-rectified flow) and k-step distillation, on the one training loop.

Liu, Gong & Liu 2022, "Flow Straight and Fast": the first flow's ODE paths are curved, so few solver
steps miss. A new flow trained on (noise, image) pairs drawn from the first one has straighter paths
(reflow); distilling it into a k-step Euler map goes further.

    python reflow.py pairs   --checkpoint checkpoints/flow_matching_mnist.pth --out-dir runs/reflow/pairs --guidance 1
    python reflow.py train   --pairs runs/reflow/pairs                 # -> runs/reflow/2-rectified/best.pth
    python reflow.py distill --pairs runs/reflow/pairs --k 1 --init-from runs/reflow/2-rectified/best.pth
    torchrun --nproc_per_node=8 reflow.py pairs ...        # each rank draws its own shards

Every stage's checkpoint records its kind (1-rectified, 2-rectified, distilled-k), its lineage and
the sampler it should be used with; sample_from_checkpoint, mnist_test.py and evaluate.py use that.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall shared CPUs

import torch
from torch.utils.data import Dataset

from checkpoint import CheckpointError, RunRecord, load_checkpoint, model_config_from, save_checkpoint, sha256
from cli import add_flags, add_weights_flag, config_from, parse_configs, run
from config import TrainConfig, check_run
from cpu import keep_freed_memory
from device import launched_ranks, rank_device, resolve_device
from matching import MatchConfig
from runlog import check_writable
from sampling import MEANFLOW_SAMPLER, SampleConfig, check_request, load_for_sampling
from solvers import FIXED_STEP, Sampler, flow_batches, make_noise
from trainer import train

MANIFEST = "manifest.json"
PAIR_SETTINGS = ("parent_sha256", "solver", "steps", "guidance", "seed", "count", "shard_size", "use_ema", "states")


def rectified_order(kind: str | None) -> int:
    """n of an 'n-rectified' kind (checkpoints from before kinds existed are 1-rectified)."""
    kind = kind or "1-rectified"
    if not kind.endswith("-rectified"):
        raise CheckpointError(f"pairs must come from a rectified flow, not a {kind} model (distilled models are final)")
    return int(kind.split("-")[0])


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Create OUT_DIR/manifest.json, or check that the existing one was written with the same settings."""
    path = out_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k} {old.get(k, False)} there, {manifest[k]} now" for k in PAIR_SETTINGS
                if old.get(k, False) != manifest[k]]  # (manifests without states hold none)
        if diff:
            raise ValueError(f"{out_dir} holds pairs drawn with other settings ({'; '.join(diff)}): "
                             "use another --out-dir, or the same settings to finish them")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")  # ranks may race: each writes its own temp file
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)


def check_room(out_dir: Path, count: int, pair_bytes: int) -> None:
    """Refuse before any drawing when count pairs of pair_bytes would not fit on out_dir's disk."""
    need = count * pair_bytes
    existing = next((p for p in (out_dir, *out_dir.resolve().parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if need > free:
        raise ValueError(f"--count {count} pairs need ~{need / 1e9:.1f} GB in {out_dir}, but {free / 1e9:.1f} GB "
                         "are free: draw fewer, or into another --out-dir")


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard_{index:05d}.pt"


@torch.no_grad()
def draw_pairs(checkpoint: str | Path, out_dir: str | Path, count: int = 20_000, shard_size: int = 5000,
               sample: SampleConfig | None = None, use_ema: bool = True, states: bool = False) -> dict:
    """Solve the parent's ODE from seeded noise with sample's sampler; write shards of (noise, image, label) to out_dir,
    skipping finished ones; states: also the path's points between them, on the solver's grid. Under torchrun each
    rank draws its own shards (no process group)."""
    sample = sample or SampleConfig()
    rank, world, local_rank = launched_ranks()
    if count < 1 or shard_size < 1:
        raise ValueError("--count and --shard-size must be >= 1")
    check_writable(Path(out_dir), "--out-dir")
    device = rank_device(resolve_device(sample.device), local_rank)
    check_request(count, sample.batch_size)
    loaded = load_for_sampling(checkpoint, sample.solver, sample.steps, sample.guidance, device, use_ema)
    drawn_with = loaded.sampler
    if states and drawn_with.solver not in FIXED_STEP:
        raise ValueError(f"--states keeps the points of a fixed-step grid: {drawn_with.solver} has none (use euler, "
                         "midpoint, heun or rk4)")
    order = rectified_order(loaded.record.kind)
    keep_freed_memory()
    cfg, out_dir = loaded.model.config, Path(out_dir)
    manifest = {"parent": str(checkpoint), "parent_sha256": sha256(checkpoint), "parent_kind": f"{order}-rectified",
                **drawn_with.record(), "seed": sample.seed, "count": count, "shard_size": shard_size,
                "use_ema": use_ema, "states": states, "model_config": asdict(cfg),
                "class_names": loaded.record.class_names}
    check_room(out_dir, count, cfg.in_channels * cfg.image_size**2 * (3 + 2 * (drawn_with.steps - 1) * states))
    write_manifest(out_dir, manifest)
    start_time, drawn, nfe = time.perf_counter(), 0, 0
    for j in range(rank, -(-count // shard_size), world):
        if shard_path(out_dir, j).is_file():
            continue  # written atomically, so an existing shard is complete
        first, last = j * shard_size, min((j + 1) * shard_size, count)
        noise = make_noise(last - first, (cfg.in_channels, cfg.image_size, cfg.image_size), sample.seed, "cpu",
                           start=first)
        # class-balanced: pair i has label i mod num_classes
        labels = torch.arange(first, last) % cfg.num_classes if cfg.num_classes is not None else None
        path, nfe = flow_batches(loaded.model, noise, labels, drawn_with, batch_size=sample.batch_size, states=states)
        x1 = ((path[:, -1] if states else path) + 1) * 127.5  # like the data: 8-bit pixels
        y = labels if labels is not None else torch.zeros(last - first, dtype=torch.long)
        inner = {"xs": path[:, 1:-1].half()} if states else {}
        save_checkpoint(shard_path(out_dir, j), {"first": first, "x0": noise.half(), "x1": x1.round().to(torch.uint8),
                                                 "y": y, **inner})
        drawn += last - first
        print(f"rank {rank}: shard {j} ({first}-{last - 1}) written", flush=True)
    seconds = time.perf_counter() - start_time
    if rank == 0:
        print(f"pairs in {out_dir}: {drawn} drawn by this process in {seconds / 60:.1f} min ({drawn_with.solver}, "
              f"{drawn_with.steps} steps, NFE {nfe}, guidance {drawn_with.guidance})")
    return {"drawn": drawn, "seconds": seconds, "nfe": nfe, **manifest}


class Pairs(Dataset):
    """Reflow pairs as training items (image x1 in [-1, 1], label, noise x0), and where the pairs kept their states
    the whole path (K + 1, C, H, W) from x0 to x1; held-out pairs for validation."""

    paired = True  # the trainer refuses --hflip: a flipped image is not the pair of its noise

    def __init__(self, x1: torch.Tensor, y: torch.Tensor, x0: torch.Tensor, xs: torch.Tensor | None = None):
        self.x1, self.y, self.x0, self.xs = x1, y, x0, xs

    def __len__(self) -> int:
        return len(self.x1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x1, x0 = self.x1[i].float() / 127.5 - 1, self.x0[i].float()
        if self.xs is None:
            return x1, int(self.y[i]), x0
        return x1, int(self.y[i]), x0, torch.cat([x0[None], self.xs[i].float(), x1[None]])


def read_shard(path: Path) -> dict:
    """One shard of pairs; ValueError naming it when it cannot be read (the drawing command redraws a deleted one)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # truncated zip, garbage: all mean "not readable"
        raise ValueError(f"pairs shard {path} is truncated or not a shard ({type(e).__name__}): delete it and run the "
                         "same `reflow.py pairs` command again to redraw it") from e


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a folder of pairs (what they were drawn from and how); ValueError when there is none."""
    if not (Path(folder) / MANIFEST).is_file():
        raise ValueError(f"no {MANIFEST} in {folder}: draw pairs first with "
                         f"`python reflow.py pairs --out-dir {folder}`")
    return json.loads((Path(folder) / MANIFEST).read_text())


def load_pairs(folder: str | Path, val_size: int, states: bool = False) -> tuple[Pairs, Pairs, dict]:
    """(train pairs, the last val_size pairs held out, manifest); every shard must be present; states: items carry
    their paths (pairs drawn with --states)."""
    folder, manifest = Path(folder), read_manifest(folder)
    n_shards = -(-manifest["count"] // manifest["shard_size"])
    missing = [j for j in range(n_shards) if not shard_path(folder, j).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of {n_shards} shards missing in {folder} (first: {missing[0]}): "
                         "run the same `reflow.py pairs` command again to finish them")
    shards = [read_shard(shard_path(folder, j)) for j in range(n_shards)]
    x1, y, x0 = (torch.cat([s[k] for s in shards]) for k in ("x1", "y", "x0"))
    if states and not manifest.get("states"):
        raise ValueError(f"{folder} holds endpoints only, not the paths between them: draw pairs with "
                         "`reflow.py pairs --states`")
    xs = torch.cat([s["xs"] for s in shards]) if states else None
    val_size = val_size or min(1000, max(1, len(x1) // 20))
    if not 0 < val_size < len(x1):
        raise ValueError(f"--val-size must lie between 1 and {len(x1) - 1} (of {len(x1)} pairs)")
    cut = len(x1) - val_size
    part = lambda idx: Pairs(x1[idx], y[idx], x0[idx], xs[idx] if xs is not None else None)  # noqa: E731
    return part(slice(cut)), part(slice(cut, None)), manifest


@dataclass
class PairData:
    """Which pairs a reflow or distillation run trains on."""

    pairs: str = "runs/reflow/pairs"  # folder written by `reflow.py pairs`
    val_size: int = 0  # the last N pairs, held out for the validation loss; 0 = a twentieth of them, at most 1000


@dataclass
class Reflowed:
    """What `reflow.py train` records."""

    recommend_steps: int = 2  # the Euler steps recorded as this model's sampler


@dataclass
class Distilled:
    """What `reflow.py distill` trains."""

    k: int = 1  # Euler steps of the distilled model (1, 2, 4, ...); not with --objective meanflow (the paths' grid)


# select_by last: distillation's held-out pair MSE rises after one epoch while its samples keep improving
# (docs/few-step.md); reflow's loss fell every epoch, so its last epoch is also its lowest.
TRAIN = TrainConfig(epochs=4, batch_size=64, lr=2e-4, lr_schedule="cosine", warmup_steps=100, out_dir="runs/reflow",
                    init_from="parent", select_by="last")  # out_dir: runs/reflow/<kind> unless given
DEFAULTS = {"train": [TRAIN, PairData(), Reflowed()], "distill": [replace(TRAIN, init_from=""), PairData(), Distilled(),
                                                                   MatchConfig()]}


def stage(command: str, argv: list[str]) -> dict:
    """reflow.py train / distill: the shared training loop on fixed pairs, from the parent's weights."""
    title = f"reflow.py {command}: " + (__doc__ or "").splitlines()[0]
    (cfg, data, own, *match), _ = parse_configs(DEFAULTS[command], None, None, argv, title, prog=f"reflow.py {command}")
    steps, match = own.k if command == "distill" else own.recommend_steps, match[0] if match else None
    if not 1 <= steps <= 1000:
        raise ValueError(f"--{'k' if command == 'distill' else 'recommend-steps'} must lie in 1..1000, got {steps}")
    if command == "distill" and cfg.objective == "meanflow" and steps != 1:
        raise ValueError("--k sets k-step distillation's steps; --objective meanflow learns every jump of the paths' "
                         "grid: leave --k out")
    if cfg.t_grid:
        raise ValueError("--t-grid is set by `reflow.py distill --k`")
    if cfg.objective == "meanflow" and command == "train":
        raise ValueError("reflow.py train trains a velocity on pairs; the one-step model from a flow's paths is "
                         "`reflow.py distill --objective meanflow` (docs/one-step.md)")
    if command == "distill" and cfg.init_from in ("", "parent"):
        raise ValueError("distill starts from trained weights: pass --init-from PATH (the reflowed model's best.pth, "
                         "or with --objective meanflow the flow itself)")
    manifest = read_manifest(data.pairs)
    init_from = manifest["parent"] if cfg.init_from == "parent" else cfg.init_from
    if not init_from:
        raise ValueError("--init-from is empty: reflow stages start from trained weights (the default: parent)")
    source = load_checkpoint(init_from)
    parent = RunRecord.read(source)
    lineage = {"parent": init_from, "parent_sha256": sha256(init_from), "parent_kind": parent.kind,
               "pairs": {k: manifest[k] for k in ("parent", *PAIR_SETTINGS)}}
    # A stage's sampler is unguided, whatever its parent recommends: its point is few NFE, and a guided
    # step costs two. Guidance stays a choice at sampling time (--guidance).
    if cfg.objective == "meanflow":  # no label is dropped: the null label keeps no average velocity, so no guidance
        kind, sampler, cfg = "meanflow", MEANFLOW_SAMPLER, replace(cfg, label_dropout=0.0)
    elif command == "train":
        kind = f"{rectified_order(manifest['parent_kind']) + 1}-rectified"
        sampler = Sampler("euler", steps)
    else:
        kind, cfg = f"distilled-{steps}", replace(cfg, t_grid=steps)
        sampler = Sampler("euler", steps)
    out_dir = cfg.out_dir if cfg.out_dir != TRAIN.out_dir else f"{cfg.out_dir}/{kind}"  # one folder per stage
    # --init-from names the stage's model, kept on resume: the weights come from the resumed run then
    cfg = replace(cfg, init_from="" if cfg.resume else init_from, out_dir=out_dir)
    if match and match.dm_weight:  # the real side: the flow the pairs were drawn from, unless told
        match = replace(match, dm_teacher=match.dm_teacher or manifest["parent"])
        lineage["teacher"] = {"path": match.dm_teacher, "sha256": sha256(match.dm_teacher)}
    run_cfg = check_run(cfg, model_config_from(source), match=match)  # before the pairs are read
    train_set, val_set, _ = load_pairs(data.pairs, data.val_size, states=cfg.objective == "meanflow")
    record = RunRecord(kind, sampler.record(), manifest.get("class_names"),
                       parent.dataset or "reflow-pairs", lineage)  # the parent's data, in its paths
    summary = train(run_cfg, train_set, val_set, record)
    print(f"done: {kind}, {', '.join(summary['files']) or 'no checkpoint written'} (step {summary['step']}, "
          f"{summary['elapsed_s'] / 60:.1f} min); sample with {sampler}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("train", "distill"):
        return stage(argv[0], argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="a new flow on fixed pairs (flags: see `reflow.py train --help`)")
    sub.add_parser("distill", help="a k-step Euler model on fixed pairs (flags: see `reflow.py distill --help`)")
    q = sub.add_parser("pairs", help="draw (noise, image, label) pairs from a checkpoint")
    q.add_argument("--checkpoint", required=True, help="the flow to straighten (1-rectified, or a reflowed one)")
    q.add_argument("--out-dir", default="runs/reflow/pairs", help="shards and manifest.json go here")
    q.add_argument("--count", type=int, default=20_000, help="pairs K to draw (class-balanced)")
    q.add_argument("--shard-size", type=int, default=5000, help="pairs per shard file (a crash loses at most one)")
    add_weights_flag(q)
    q.add_argument("--states", action="store_true", help="also keep each path's points on the solver's grid "
                   "(`distill --objective meanflow` trains on them)")
    add_flags(q, SampleConfig())  # pair i's noise depends only on (seed, i); docs/few-step.md draws them at w = 1
    args = p.parse_args(argv)
    sample = config_from(args, SampleConfig())
    sample.check()
    return draw_pairs(args.checkpoint, args.out_dir, args.count, args.shard_size, sample, args.weights == "ema",
                      args.states)


if __name__ == "__main__":
    run(main)
