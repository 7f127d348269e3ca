"""Benchmarks that write the JSON (and PNG) behind the docs' tables: training speed, NFE vs quality, guidance sweep,
few-step stages, FID vs N, inversion and likelihood against NFE; each subcommand's help names its table.

    python benchmark.py train-speed mnist --preset cpu            # flags after the script name are its flags
    python benchmark.py train-speed rf --preset small32 --image-size 64
    python benchmark.py nfe --data-root data        # quality per solver and steps, of make train's checkpoint
    python benchmark.py guidance --data-root data   # quality per guidance scale
    python benchmark.py fid-sizes --checkpoint runs/cifar/rf_best.pth --real-dir photos     # FID against N
    python benchmark.py inversion --checkpoints runs/reflow/1-rf.pth,runs/reflow/2-rectified/best.pth

The image-folder sweeps (Inception FID) are in docs/results-cifar.md, the inversion one in docs/inversion.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall shared CPUs

import torch

from checkpoint import MNIST_TRAINED
from cli import add_flags, config_from, parse_configs, run
from config import check_run
from data import Batch, load_mnist
from cpu import cpu_class, cpu_name, isa_caps
from editing import gaussianity, invert_model, psnr, regenerate
from evaluate import balanced_labels, fid_quality, generated_features, mnist_quality, straightness_of, test_digits
from likelihood import image_bits_per_dim
from readers import CLASSIFIER_PATH, load_classifier
from runlog import check_file_out, check_writable, figure
from fid import STATS_DIR, cache_stats, frechet_from_stats, gaussian_stats, real_features, real_files, real_stats
from sampling import Loaded, SampleConfig, check_guidance, checkpoint_can_guide, load_for_sampling
from solvers import FIXED_STEP, Sampler
from trainer import setup, train_step


def machine() -> dict:
    """What the figures were measured on: speeds hold per GPU model or CPU class (AVX2, AVX-512, AMX). A CPU whose
    kernels are capped to an older class only stands in for it, so the cap is recorded beside the class it gives."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    caps = isa_caps()
    cpu = f"{cpu_name()} ({cpu_class()}{', a stand-in capped by ' + caps if caps else ''})"
    return {"device": gpu or cpu, "cpu_class": cpu_class(), "isa_caps": caps or None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def train_speed(script: str, argv: list[str], steps: int, warmup: int) -> dict:
    """Images/s of the full training step (forward, backward, optimizer, EMA) on random data, after warm-up, set up
    as training sets it up (trainer.setup)."""
    import mnist_train
    import rectified_flow_train

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    module = {"mnist": mnist_train, "rf": rectified_flow_train}[script]
    default = module.default_preset() if hasattr(module, "default_preset") else None
    (cfg, model_cfg, _, meanflow), preset = parse_configs(module.DEFAULTS, module.PRESETS, default, argv)
    run_cfg = check_run(cfg, model_cfg, meanflow)
    rt, parts, model_cfg = *setup(run_cfg), run_cfg.model
    shape = (cfg.batch_size, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    x = torch.rand(shape, device=rt.device) * 2 - 1
    y = torch.randint(0, model_cfg.num_classes, (cfg.batch_size,), device=rt.device) if model_cfg.num_classes else None
    for step in range(warmup + steps):
        if step == warmup:
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = train_step(parts, cfg, Batch(x, y), step, meanflow=run_cfg.meanflow)
    loss.item()  # wait for the device
    seconds = time.perf_counter() - start
    return {"script": script, "preset": preset, "images_per_s": steps * cfg.batch_size / seconds,
            "step_ms": 1000 * seconds / steps, "autocast": rt.amp, "channels_last": rt.channels_last,
            "params_M": sum(p.numel() for p in parts.model.parameters()) / 1e6,
            "train": asdict(cfg), "model": asdict(model_cfg), **machine()}


@dataclass
class Reading:
    """What quality is measured against: MNIST's classifier on its test digits, or a folder's Inception FID."""

    n: int = 1000  # generated (and real) images per setting
    data_root: str = "data"  # folder holding MNIST/raw (real test digits)
    classifier: str = CLASSIFIER_PATH  # the MNIST reader (evaluate.py train-classifier)
    real_dir: str | None = None  # image-folder checkpoints: Inception FID against this folder
    n_real: int | None = None  # real images for the FID (default: n)
    stats_cache: str = STATS_DIR  # folder of cached real FID statistics
    out_dir: str = "benchmarks"  # where the JSON and plots go


def quality_rows(loaded: Loaded, settings: list[dict], reading: Reading, sample: SampleConfig) -> list[dict]:
    """Quality of each setting (solver/steps/guidance/tolerances) on one loaded checkpoint: MNIST accuracy +
    Fréchet distance in the classifier's features, or with reading.real_dir the Inception FID."""
    for s in settings:  # refuse a bad guidance scale before the first setting's minutes of sampling
        check_guidance(loaded.ckpt, s["guidance"])
    model, n, seed, batch = loaded.model, reading.n, sample.seed, sample.batch_size
    device = next(model.parameters()).device
    if reading.real_dir:
        real = real_stats(reading.real_dir, model.config.image_size, reading.n_real or n, reading.stats_cache, device)
        floor = read_floor(Path(reading.out_dir) / "fid_sizes.json", real.key, n)
        measure = lambda s: {**fid_quality(model, real, n, Sampler(**s), seed, batch), "real_key": real.key,
                             **floor}
    else:
        classifier, accuracy = load_classifier(reading.classifier, device)
        real = load_mnist(reading.data_root, train=False, download=False)
        measure = lambda s: {**mnist_quality(model, classifier, real, n, Sampler(**s), seed, batch),
                             "classifier_accuracy": accuracy}
    rows = []
    for s in settings:
        row = {**measure(s), **s}
        rows.append(row)
        score = (f"FID {row['fid']:.2f}" if "fid" in row else
                 f"acc {row['accuracy']:.2%}  Fréchet {row['frechet']:.3f}  (floor {row['floor']:.3f})")
        print(f"{row['solver']:>8} {str(row.get('rtol', row['steps'])):>7} NFE {row['nfe']:>5}  guidance "
              f"{row['guidance']}  {score}  {row['seconds']:.1f} s", flush=True)
    return rows


def read_floor(path: Path, real_key: str, n: int) -> dict:
    """The real-vs-real FID floor at n images from `benchmark.py fid-sizes` for the same real set, if measured."""
    if not path.is_file():
        return {}
    sizes = json.loads(path.read_text())
    floors = {row["n"]: row["fid_mean"] for row in sizes["rows"] if row["set"] == "real"}
    return {"floor": floors[n]} if sizes["real_key"] == real_key and n in floors else {}


def few_step_rows(paths: list[str], nfe: list[int], reading: Reading, sample: SampleConfig, n_straightness: int = 200,
                  guided: float = 0.0, minutes: list[float] | None = None) -> list[dict]:
    """Each checkpoint (1-RF, 2-RF, distilled, meanflow) at each NFE of its one-step rule (Euler, or meanflow jumps
    for average-velocity models), at its own sampler and, with guided w, one guided step; plus its straightness
    and, with minutes, the training minutes behind it."""
    if minutes and len(minutes) != len(paths):
        raise ValueError(f"--minutes gives {len(minutes)} values for {len(paths)} checkpoints: one per checkpoint")
    rows = []
    for i, path in enumerate(paths):
        loaded = load_for_sampling(path, device=sample.device)
        model, kind = loaded.model, loaded.record.kind
        solver, steps, guidance = loaded.sampler.solver, loaded.sampler.steps, loaded.sampler.guidance
        jump = "meanflow" if model.config.average_velocity else "euler"
        # every NFE budget unguided, and with the recorded guidance where it has one (a guided step costs two NFE)
        settings = [dict(solver=jump, steps=k // passes, guidance=w) for k in nfe
                    for w, passes in dict.fromkeys([(1.0, 1), (guidance, 2 if guidance != 1.0 else 1)])
                    if k % passes == 0]
        if dict(solver=solver, steps=steps, guidance=guidance) not in settings:
            settings.append(dict(solver=solver, steps=steps, guidance=guidance))
        if guided and checkpoint_can_guide(loaded.ckpt) and guidance == 1.0:
            settings.append(dict(solver=jump, steps=1, guidance=guided))
        straight = straightness_of(model, n_straightness, guidance, sample.seed)
        print(f"{kind}: straightness {straight['straightness']:.4f}, distance of k-step samples from the "
              f"{straight['reference_steps']}-step ones {straight['distance']}", flush=True)
        for row in quality_rows(loaded, settings, reading, sample):
            row.update(kind=kind, checkpoint=path, straightness=straight["straightness"], distance=straight["distance"],
                       recommended=(row["solver"], row["steps"], row["guidance"]) == (solver, steps, guidance),
                       **({"minutes": minutes[i]} if minutes else {}))
            rows.append(row)
    return rows


def parse_setting(text: str) -> Sampler:
    """'euler:4' -> euler, 4 steps; 'dopri5:1e-5' -> dopri5 at rtol = atol = 1e-5 (unguided)."""
    solver, _, value = text.partition(":")
    try:
        if solver == "dopri5":
            return Sampler(solver, 0, 1.0, float(value or 1e-5), float(value or 1e-5))
        return Sampler(solver, int(value or Sampler.steps))
    except (TypeError, ValueError) as e:
        raise ValueError(f"a setting looks like euler:4 or dopri5:1e-5 ({e})") from None


def inversion_rows(paths: list[str], settings: list[Sampler], data_root: str, n: int, sample: SampleConfig,
                   exact_n: int = 0, exact_setting: str = "euler:8") -> list[dict]:
    """Per checkpoint and solver setting, on n class-balanced MNIST test digits under their labels (w = 1):
    invert-then-regenerate PSNR, how Gaussian the inverted noise is, and bits/dim (Hutchinson, one probe);
    with exact_n, exact against Hutchinson divergence on that many digits at exact_setting (first checkpoint)."""
    pixels, labels = test_digits(data_root, n)
    images, rows, batch = pixels.float() / 255, [], sample.batch_size
    for i, path in enumerate(paths):
        loaded = load_for_sampling(path, device=sample.device)
        model, kind = loaded.model, loaded.record.kind
        for setting in settings:
            inverted = invert_model(model, images, labels, setting, batch)
            back = regenerate(model, inverted.noise, labels, setting, batch)
            like = image_bits_per_dim(model, pixels, labels, setting, seed=sample.seed, batch_size=batch)
            row = {"kind": kind, "checkpoint": path, **setting.record(), "nfe": inverted.nfe, "n": n,
                   "psnr": psnr(back, images).mean().item(), "invert_seconds": inverted.seconds,
                   **{f"noise_{k}": v for k, v in gaussianity(inverted.noise).items()},
                   "bpd": like["bpd"], "bpd_se": like["bpd_se"], "likelihood_seconds": like["seconds"]}
            rows.append(row)
            where = setting.rtol if setting.solver == "dopri5" else setting.steps
            print(f"{kind:>12} {setting.solver:>8} {where:>6}"
                  f"  NFE {row['nfe']:>4}  PSNR {row['psnr']:6.2f} dB  noise std {row['noise_std']:.3f} "
                  f"KS {row['noise_ks']:.3f}  {row['bpd']:.3f} ± {row['bpd_se']:.3f} bits/dim  "
                  f"({row['invert_seconds']:.1f} + {row['likelihood_seconds']:.1f} s)", flush=True)
        if i == 0 and exact_n:
            rows.append(divergence_check(model, kind, path, pixels[:exact_n], labels[:exact_n], exact_setting, sample))
    return rows


def divergence_check(model: torch.nn.Module, kind: str, path: str, pixels: torch.Tensor, labels: torch.Tensor,
                     setting_text: str, sample: SampleConfig) -> dict:
    """Bits/dim of the same digits with the exact divergence and with Hutchinson's estimate."""
    setting = parse_setting(setting_text)
    pair = {name: image_bits_per_dim(model, pixels, labels, setting, name, seed=sample.seed,
                                     batch_size=sample.batch_size) for name in ("exact", "hutchinson")}
    diff = torch.tensor(pair["hutchinson"]["per_image"]) - torch.tensor(pair["exact"]["per_image"])
    print(f"{kind}: exact {pair['exact']['bpd']:.4f} vs Hutchinson {pair['hutchinson']['bpd']:.4f} bits/dim on "
          f"{len(pixels)} digits ({setting_text}); per-image difference {diff.mean():.4f} ± {diff.std():.4f} (sd); "
          f"{pair['exact']['seconds']:.0f} vs {pair['hutchinson']['seconds']:.1f} s", flush=True)
    return {"kind": kind, "checkpoint": path, **setting.record(), "n": len(pixels), "divergence_check": True,
            "bpd_exact": pair["exact"]["bpd"], "bpd_hutchinson": pair["hutchinson"]["bpd"],
            "diff_mean": diff.mean().item(), "diff_sd": diff.std().item(),
            "exact_seconds": pair["exact"]["seconds"], "hutchinson_seconds": pair["hutchinson"]["seconds"]}


def plot_inversion(rows: list[dict], path: Path, title: str) -> None:
    """Reconstruction PSNR and bits/dim against NFE, one line per model kind."""
    rows = [r for r in rows if not r.get("divergence_check")]
    with figure(path, ncols=2, figsize=(10, 4)) as (_, axes, _):
        for kind in dict.fromkeys(r["kind"] for r in rows):
            own = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["nfe"])
            for ax, y in zip(axes, ("psnr", "bpd")):
                ax.plot([r["nfe"] for r in own], [r[y] for r in own], "o-", label=kind)
        for ax, label in zip(axes, ("invert-then-regenerate PSNR (dB)", "bits/dim (Hutchinson, 1 probe)")):
            ax.set(xscale="log", xlabel="NFE per direction", ylabel=label, title=title)
            ax.legend(fontsize=8)


def plot_minutes(rows: list[dict], path: Path, title: str) -> None:
    """Excess Fréchet distance over the real-vs-real floor against total training minutes: one line per model kind
    and sampler (1 and 2 NFE, and the recorded sampler), a point per checkpoint of that kind."""
    shown = [r for r in rows if r["nfe"] <= 2 or r["recommended"]]
    keys = dict.fromkeys((r["kind"], r["solver"], r["steps"], r["guidance"], r["nfe"]) for r in shown)
    with figure(path, figsize=(9, 4.5)) as (_, ax, plt):
        for i, key in enumerate(keys):
            line = sorted((r for r in shown if (r["kind"], r["solver"], r["steps"], r["guidance"], r["nfe"]) == key),
                          key=lambda r: r["minutes"])
            kind, solver, steps, guidance, nfe = key
            ax.plot([r["minutes"] for r in line], [r["excess"] for r in line], "o-" if nfe == 1 else "s--",
                    color=plt.cm.tab20(i % 20), label=f"{kind}: {solver} {steps}, w {guidance:g} ({nfe} NFE)")
        ax.set(xlabel="total training minutes (every stage)", ylabel="Fréchet distance minus real-vs-real floor",
               yscale="log", title=title)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))


def subset_fids(name: str, feats: torch.Tensor, n: int, mu: torch.Tensor, sigma: torch.Tensor) -> dict:
    """FID of every disjoint strided n-subset of feats against (mu, sigma): strides keep class-grouped sets balanced."""
    stride = len(feats) // n
    fids = [frechet_from_stats(*gaussian_stats(feats[k::stride][:n]), mu, sigma) for k in range(stride)]
    row = {"set": name, "n": n, "subsets": stride, "fid_mean": statistics.fmean(fids),
           "fid_std": statistics.stdev(fids) if stride > 1 else 0.0, "fids": fids}
    print(f"{name:>9} N={n:>6}: FID {row['fid_mean']:.2f} ± {row['fid_std']:.2f} over {stride} disjoint subsets",
          flush=True)
    return row


def fid_sizes(checkpoint: str, real_dir: str, n: int, sizes: list[int], sample: SampleConfig,
              stats_cache: str = STATS_DIR) -> dict:
    """What an FID at small N means: real-vs-real and generated-vs-real FID at each N, and the Inception's speed. The
    folder is split into two disjoint halves (even / odd files, so both keep every class): the real rows compare n
    images of one half with the whole other half (the floor), the generated rows compare n generated images with that
    same half. The real statistics of the whole folder are cached on the way, so `evaluate.py fid --n-real ALL` reuses
    them."""
    loaded = load_for_sampling(checkpoint, sample.solver, sample.steps, sample.guidance, sample.device)
    model, sampler = loaded.model, loaded.sampler
    device, sizes, files = next(model.parameters()).device, sorted(sizes), real_files(real_dir, None)
    if sizes[0] < 2 or sizes[-1] > min(len(files) // 2, n):
        raise ValueError(f"--sizes must lie between 2 and {min(len(files) // 2, n)}: half of the "
                         f"{len(files)} real images and at most --n {n} generated ones")
    # an --n that cannot be class-balanced fails before the Inception's minutes
    if model.config.num_classes is not None:
        balanced_labels(n, model.config.num_classes)
    start = time.perf_counter()
    real = real_features(files, real_dir, model.config.image_size, device)
    seconds = time.perf_counter() - start
    print(f"Inception features of {len(files)} real images in {seconds:.0f} s: {len(files) / seconds:.1f} img/s "
          f"(decoding and resizing included) on {machine()['device']}", flush=True)
    stats = cache_stats(real, real_dir, model.config.image_size, stats_cache)
    mu, sigma = gaussian_stats(real[1::2])
    rows = [subset_fids("real", real[0::2], k, mu, sigma) for k in sizes]
    fake, samples = generated_features(model, n, sampler, sample.seed, sample.batch_size)
    rows += [subset_fids("generated", fake, k, mu, sigma) for k in sizes]
    return {"real_dir": str(Path(real_dir).resolve()), "n_real": len(files), "real_key": stats.key,
            "reference": f"the odd-numbered half of the folder ({len(real[1::2])} images)",
            "inception_images_per_s": len(files) / seconds, "checkpoint": checkpoint, "n": n,
            "solver": sampler.solver, "steps": sampler.steps, "nfe": samples.nfe, "guidance": sampler.guidance,
            "seed": sample.seed,
            "rows": rows}


def plot(rows: list[dict], x: str, path: Path, title: str, group: str = "solver") -> None:
    """Fréchet distance (or Inception FID) vs x, one line per solver (or per model kind), log-x for NFE."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    y = "fid" if "fid" in rows[0] else "frechet"
    with figure(path, figsize=(6, 4)) as (_, ax, _):
        for name in dict.fromkeys(r[group] for r in rows if not r.get("reference")):
            own = [r for r in rows if r[group] == name and not r.get("reference")]
            # a model's other sampler is a marker, not a line point
            line = [r for r in own if r["solver"] == own[0]["solver"]]
            (drawn,) = ax.plot(*zip(*sorted((r[x], r[y]) for r in line)), "o-", label=name)
            for r in own:
                if r not in line:
                    ax.plot(r[x], r[y], "*", ms=12, color=drawn.get_color(),
                            label=f"{name}: {r['solver']} {r['steps']} steps")
        for r in rows:
            if r.get("reference"):
                ax.axhline(r[y], color="gray", ls="--", label=f"reference {r['solver']} {r['steps']} steps")
        if "floor" in rows[0]:
            ax.axhline(rows[0]["floor"], color="black", ls=":", label="real vs real floor")
        if x == "nfe":
            ax.set(xscale="log", yscale="log")
            for axis in (ax.xaxis, ax.yaxis):  # plain numbers (1, 2, 4, 8), not powers of ten
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
            ax.set_xticks([2**i for i in range(int(max(r[x] for r in rows)).bit_length())])
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.set(xlabel="NFE (network evaluations per image)" if x == "nfe" else "guidance scale w",
               ylabel="Inception FID" if y == "fid" else "Fréchet distance (MNIST-CNN features)", title=title)
        ax.legend(fontsize=8)


# SampleConfig fields a command sweeps or sets itself: no flag of theirs
SWEPT = {"train-speed": ("steps",), "nfe": ("solver", "steps"), "guidance": ("guidance",),
               "fewstep": ("solver", "steps", "guidance"), "inversion": ("solver", "steps", "guidance")}


def parser() -> argparse.ArgumentParser:
    """benchmark.py's flags: per command its inputs, Reading's and SampleConfig's flags, and its own."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("train-speed", help="images/s of the training step (docs/cpu-performance.md: the "
                       "training-speed table)")
    s.add_argument("script", choices=["mnist", "rf"], help="whose presets and flags: mnist_train, rectified_flow_train")
    s.add_argument("--steps", type=int, default=20, help="timed steps")
    s.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    s.add_argument("--out", default="benchmarks/train_speed.json", help="JSON to write (default: %(default)s)")
    commands = {"nfe": "sample quality per solver and steps (docs/results-mnist.md: the solver table)",
                "guidance": "sample quality per guidance scale (docs/results-mnist.md: the guidance table)",
                "fewstep": "1-RF vs reflowed vs distilled: quality at 1-8 NFE and straightness (docs/few-step.md: the "
                           "table of stages)"}
    for name, helptext in commands.items():
        q = sub.add_parser(name, help=helptext)
        if name == "fewstep":
            q.add_argument("--checkpoints", required=True, help="comma-separated: the 1-rectified flow first, then "
                           "its descendants")
        else:
            q.add_argument("--checkpoint", default=MNIST_TRAINED, help="checkpoint or exported folder to read "
                           "(default: %(default)s)")
        add_flags(q, Reading())
        add_flags(q, SampleConfig(), SWEPT[name])
    q = sub.choices["nfe"]
    q.add_argument("--solvers", default="euler,midpoint,heun,rk4", help="fixed-step solvers (default: %(default)s)")
    q.add_argument("--steps", default="2,4,8,16,32", help="steps per fixed-step solver")
    q.add_argument("--tolerances", default="1e-2,1e-3,1e-4", help="dopri5 rtol=atol values; empty to skip")
    q.add_argument("--ref-steps", type=int, default=2000, help="rk4 steps of the reference (FlowGen's 2000); 0 = none")
    sub.choices["guidance"].add_argument("--scales", default="1,1.5,2,3,5", help="guidance scales w (default: "
                                         "%(default)s)")
    f = sub.choices["fewstep"]
    f.add_argument("--nfe", default="1,2,4,8", help="Euler NFE budgets per model")
    f.add_argument("--n-straightness", type=int, default=200,
                   help="noise samples for the straightness (multiple of 10)")
    f.add_argument("--guided", type=float, default=0.0, help="also one guided step at this w (2 NFE); 0 = none")
    f.add_argument("--minutes", default="", help="comma-separated total training minutes per checkpoint: "
                   "adds a plot of quality against training time")
    z = sub.add_parser("fid-sizes", help="FID vs N, real-vs-real and generated (docs/results-cifar.md: the FID "
                       "against N table)")
    z.add_argument("--checkpoint", required=True, help="an image-folder checkpoint or exported folder")
    z.add_argument("--real-dir", required=True, help="folder of real images (all of them are used)")
    z.add_argument("--n", type=int, default=5000, help="generated images (class-balanced)")
    z.add_argument("--sizes", default="1000,2000,5000", help="subset sizes N whose FID is reported")
    z.add_argument("--stats-cache", default=STATS_DIR, help="folder of cached real FID statistics")
    z.add_argument("--out-dir", default="benchmarks", help="where fid_sizes.json goes (default: %(default)s)")
    add_flags(z, SampleConfig())
    inv = sub.add_parser("inversion", help="invert-then-regenerate PSNR, noise Gaussianity and bits/dim against NFE "
                         "(docs/inversion.md: the table of models and solvers)")
    inv.add_argument("--checkpoints", required=True, help="comma-separated, e.g. the 1-rectified flow, then reflowed")
    inv.add_argument("--settings", default="euler:1,euler:2,euler:4,euler:8,euler:16,rk4:8,dopri5:1e-5",
                     help="solver:steps (dopri5:tolerance), comma-separated")
    inv.add_argument("--exact-n", type=int, default=0,
                     help="digits for exact vs Hutchinson divergence (slow); 0 = none")
    inv.add_argument("--exact-setting", default="euler:8", help="the setting of the exact check (default: %(default)s)")
    inv.add_argument("--n", type=int, default=100, help="MNIST test digits (class-balanced)")
    inv.add_argument("--data-root", default="data", help="folder holding MNIST/raw (default: %(default)s)")
    inv.add_argument("--out-dir", default="benchmarks", help="where inversion.json goes (default: %(default)s)")
    add_flags(inv, SampleConfig(), SWEPT["inversion"])
    return p


def check_reader(reading: Reading) -> None:
    """Before minutes of sampling: MNIST's reader and the digits it reads against (none for an FID's folder)."""
    if not reading.real_dir:
        load_classifier(reading.classifier)
        load_mnist(reading.data_root, train=False, download=False)


def sweep(args: argparse.Namespace, reading: Reading, sample: SampleConfig) -> tuple[list[dict], Path]:
    """benchmark.py nfe | guidance | fewstep: the rows of a quality sweep, plotted; returns them and their JSON path."""
    out_dir, title = Path(reading.out_dir), f"N={reading.n} per setting"
    if args.command == "fewstep":
        check_reader(reading)
        minutes = [float(m) for m in args.minutes.split(",")] if args.minutes else None
        rows = few_step_rows(args.checkpoints.split(","), [int(k) for k in args.nfe.split(",")], reading, sample,
                             args.n_straightness, args.guided, minutes)
        plot(rows, "nfe", out_dir / "fewstep.png", title, group="kind")
        if minutes:
            plot_minutes(rows, out_dir / "fewstep_minutes.png", title)
        return rows, out_dir / "fewstep.json"
    loaded = load_for_sampling(args.checkpoint, sample.solver, sample.steps, sample.guidance, sample.device)
    check_reader(reading)
    if args.command == "guidance":
        drawn = loaded.sampler
        settings = [dict(solver=drawn.solver, steps=drawn.steps, guidance=float(w)) for w in args.scales.split(",")]
        rows = quality_rows(loaded, settings, reading, sample)
        plot(rows, "guidance", out_dir / "guidance.png", f"{drawn.solver}, {drawn.steps} steps, N={reading.n}")
        return rows, out_dir / "guidance.json"
    w = loaded.sampler.guidance
    settings = [dict(solver=s, steps=int(k), guidance=w)
                for s in args.solvers.split(",") for k in args.steps.split(",")]
    settings += [dict(solver="dopri5", steps=0, guidance=w, rtol=float(t), atol=float(t))
                 for t in args.tolerances.split(",") if t]
    if args.ref_steps:
        settings.append(dict(solver="rk4", steps=args.ref_steps, guidance=w))
    rows = quality_rows(loaded, settings, reading, sample)
    if args.ref_steps:
        rows[-1]["reference"] = True
    plot(rows, "nfe", out_dir / "nfe_vs_frechet.png", title)
    return rows, out_dir / "nfe.json"


LISTS = {"solvers": str, "steps": int, "tolerances": float, "scales": float, "nfe": int, "minutes": float, "sizes": int}
COUNTS = {"n": (1, 100_000), "warmup": (0, 10_000), "ref_steps": (0, 100_000), "n_straightness": (10, 100_000),
          "exact_n": (0, 10_000), "n_real": (1, 100_000)}  # (least, most) a command takes
OUTPUTS = {"out": check_file_out, "out_dir": check_writable, "stats_cache": check_writable}


def check_args(args: argparse.Namespace) -> None:
    """Every list, count and output flag parsed and bounded before any work, each refusal naming its flag."""
    for name, kind in LISTS.items():
        text = getattr(args, name, None)
        if not isinstance(text, str) or not text:
            continue
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"--{name} takes comma-separated {kind.__name__}s, got {text!r}") from None
        if kind is str and (bad := [v for v in values if v not in FIXED_STEP]):
            raise ValueError(f"--{name}: unknown fixed-step solver(s) {bad}: choose from {', '.join(FIXED_STEP)}")
        if kind is not str and not all(0 < v <= 100_000 for v in values):
            raise ValueError(f"--{name} takes values in (0, 100000], got {text!r}")
    for name, (least, most) in COUNTS.items():
        if getattr(args, name, None) is not None and not least <= getattr(args, name) <= most:
            raise ValueError(f"--{name.replace('_', '-')} must lie in {least}..{most}, got {getattr(args, name)}")
    if args.command == "train-speed" and not 1 <= args.steps <= 100_000:
        raise ValueError(f"--steps must be >= 1 and at most 100000, got {args.steps}")
    if not 0 <= getattr(args, "guided", 0) <= 100:  # (not: NaN fails too)
        raise ValueError(f"--guided must lie in [0, 100] (0 = none), got {args.guided}")
    for name in ("settings", "exact_setting"):
        for text in (getattr(args, name, None) or "").split(",") if getattr(args, name, None) else ():
            try:
                parse_setting(text)
            except ValueError as e:
                raise ValueError(f"--{name.replace('_', '-')} {text!r}: {e}") from None
    for name, check in OUTPUTS.items():
        if getattr(args, name, None):
            check(Path(getattr(args, name)), f"--{name.replace('_', '-')}")
    if getattr(args, "real_dir", None) and not Path(args.real_dir).is_dir():
        raise ValueError(f"--real-dir {args.real_dir} is not a folder of images")


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser()
    args, rest = p.parse_known_args(argv)
    if rest and args.command != "train-speed":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    check_args(args)
    sample = config_from(args, SampleConfig(), SWEPT.get(args.command, ()))
    sample.check()
    if args.command == "train-speed":
        rows, out = [train_speed(args.script, rest, args.steps, args.warmup)], Path(args.out)
        r = rows[0]
        print(f"{args.script} preset {r['preset']}: {r['params_M']:.2f}M params, {r['model']['image_size']} px, batch "
              f"{r['train']['batch_size']}: {r['images_per_s']:.1f} img/s ({r['step_ms']:.0f} ms/step) on "
              f"{r['device']}, autocast {r['autocast']}, {'channels_last' if r['channels_last'] else 'NCHW'}, "
              f"{r['threads']} threads, torch {r['torch']}")
    elif args.command == "fid-sizes":
        result = fid_sizes(args.checkpoint, args.real_dir, args.n, [int(k) for k in args.sizes.split(",")], sample,
                           args.stats_cache)
        rows, out = result.pop("rows"), Path(args.out_dir) / "fid_sizes.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), **result, "rows": rows}, indent=2))
        print(f"wrote {out}")
        return rows
    elif args.command == "inversion":
        settings = [parse_setting(text) for text in args.settings.split(",")]
        rows = inversion_rows(args.checkpoints.split(","), settings, args.data_root, args.n, sample, args.exact_n,
                              args.exact_setting)
        plot_inversion(rows, Path(args.out_dir) / "inversion.png", f"N={args.n} MNIST test digits")
        out = Path(args.out_dir) / "inversion.json"
    else:
        rows, out = sweep(args, config_from(args, Reading()), sample)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    run(main)
