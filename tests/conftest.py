"""Shared fixtures: the repo on sys.path, small threads, and the real data sets in ../shared/data."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def mnist_root() -> Path:
    """../shared/data, which holds MNIST/raw (skips the test where it is absent)."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("real MNIST needs ../shared/data/MNIST/raw (see ../shared/README.md)")
    return SHARED_DATA


@pytest.fixture
def cifar_root() -> Path:
    """The CIFAR-10 test images as JPEG folders (skips the test where they are absent)."""
    path = SHARED_DATA / "cifar10-test-jpg"
    if not path.is_dir():
        pytest.skip("real photos need ../shared/data/cifar10-test-jpg (see ../shared/README.md)")
    return path
