"""Draw digits on request from an MNIST checkpoint into a labelled grid PNG (one row per digit).

    python mnist_test.py --digits 0,3,7 --per-digit 8 --out samples/digits.png

Before `make train` has written a checkpoint, it draws with the committed model in pretrained/mnist-1rf.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall shared CPUs

import torch

from checkpoint import MNIST_TRAINED, mnist_checkpoint
from cli import add_flags, add_weights_flag, config_from, run
from sampling import SampleConfig, check_image_out, load_for_sampling, sample_model, save_grid

MAX_PER_DIGIT = 1000  # a row of 1,000 digits is a 60,000-pixel-wide PNG already


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
    p.add_argument("--digits", type=parse_digits, default=list(range(10)), help="digits to draw, e.g. 0,3,7")
    p.add_argument("--per-digit", type=int, default=8, help="samples per digit (one grid row each)")
    p.add_argument("--out", default="samples/mnist_test.png", help="grid PNG to write")
    add_weights_flag(p)
    add_flags(p, SampleConfig())
    args = p.parse_args(argv)
    sample = config_from(args, SampleConfig())
    sample.check()
    if not 1 <= args.per_digit <= MAX_PER_DIGIT:
        p.error(f"--per-digit must lie in 1..{MAX_PER_DIGIT} (one grid row each), got {args.per_digit}")
    check_image_out(args.out)
    labels = torch.tensor(args.digits).repeat_interleave(args.per_digit)
    checkpoint, note = mnist_checkpoint(args.checkpoint)
    if note:
        print(note)
    loaded = load_for_sampling(checkpoint, sample.solver, sample.steps, sample.guidance, sample.device,
                               use_ema=args.weights == "ema")
    samples = sample_model(loaded.model, len(labels), labels, loaded.sampler, sample.seed, sample.batch_size)
    save_grid(samples.images, args.out, samples.labels, loaded.record.class_names)
    drawn = samples.sampler
    print(f"wrote {args.out}: {len(labels)} digits, solver {drawn.solver}, steps {drawn.steps}, "
          f"NFE {samples.nfe} per image, guidance {drawn.guidance}, {samples.seconds:.2f} s")


if __name__ == "__main__":
    run(main)
