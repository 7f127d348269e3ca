"""Draw digits on request from an MNIST checkpoint into a labelled grid PNG (one row per digit).

    python mnist_test.py --digits 0,3,7 --per-digit 8 --out samples/digits.png

Before `make train` has written a checkpoint, it draws with the committed model in pretrained/mnist-1rf.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall shared CPUs

import torch

from checkpoint import CheckpointError
from pretrained import MNIST_TRAINED, mnist_checkpoint
from sampling import DEVICE_HELP, load_for_sampling, sample_model, save_grid
from solvers import SOLVERS


def parse_digits(text: str) -> list[int]:
    """'0,3,7' -> [0, 3, 7]; each must be a digit 0-9."""
    try:
        digits = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--digits takes comma-separated digits, e.g. 0,3,7 (got {text!r})")
    bad = [d for d in digits if not 0 <= d <= 9]
    if bad or not digits:
        raise argparse.ArgumentTypeError(f"--digits must be between 0 and 9 (got {text!r})")
    return digits


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help=f"a checkpoint of mnist_train.py, or an exported folder (default: {MNIST_TRAINED}, or "
                        "pretrained/mnist-1rf until there is one)")
    p.add_argument("--solver", default=None, choices=SOLVERS,
                   help="ODE solver (default: the checkpoint's recommended sampler, else midpoint)")
    p.add_argument("--steps", type=int, default=None, help="solver steps, ignored by dopri5 (default: as --solver)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale w, 1 = none (default: the checkpoint's recorded sampler; "
                        "1.5 draws the digit asked for ~99.6%% of the time, at some cost in diversity)")
    p.add_argument("--digits", type=parse_digits, default=list(range(10)), help="digits to draw, e.g. 0,3,7")
    p.add_argument("--per-digit", type=int, default=8, help="samples per digit (one grid row each)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", default="samples/mnist_test.png", help="grid PNG to write")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--raw-weights", action="store_true", help="sample the raw weights instead of the EMA")
    args = p.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or args.per_digit < 1:
        p.error("--steps and --per-digit must be >= 1")
    labels = torch.tensor(args.digits).repeat_interleave(args.per_digit)
    checkpoint, note = mnist_checkpoint(args.checkpoint)
    if note:
        print(note)
    loaded = load_for_sampling(checkpoint, args.solver, args.steps, args.guidance, args.device,
                               use_ema=not args.raw_weights)
    samples = sample_model(loaded.model, len(labels), labels, loaded.solver, loaded.steps, loaded.guidance, args.seed,
                           batch_size=256)
    save_grid(samples.images, args.out, samples.labels, loaded.ckpt.get("class_names"))
    print(f"wrote {args.out}: {len(labels)} digits, solver {samples.solver}, steps {samples.steps}, "
          f"NFE {samples.nfe} per image, guidance {samples.guidance}, {samples.seconds:.2f} s")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
