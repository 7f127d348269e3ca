"""Run under torchrun by test_rectified_flow.py: train the tiny model with DDP (gloo, CPU), then save
each rank's weights so the test can check that the ranks stayed in sync."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TINY, blobs, tiny_config  # noqa: E402
from trainer import train  # noqa: E402

if __name__ == "__main__":
    import os

    tmp = Path(sys.argv[1])
    summary = train(tiny_config(tmp, epochs=2, batch_size=16), TINY, blobs(), blobs(24, seed=1))
    torch.save(summary["model"].state_dict(), tmp / f"rank{os.environ['RANK']}_weights.pt")
