"""Shared fixtures: the repo on sys.path, small threads, the real data sets under DATA_ROOT (make test passes it)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DATA_ROOT") or ROOT.parent / "shared" / "data").resolve()
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def mnist_root() -> Path:
    """DATA_ROOT, which holds MNIST/raw (skips the test where it is absent)."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST needs {SHARED_DATA}/MNIST/raw (make test DATA_ROOT=DIR)")
    return SHARED_DATA


@pytest.fixture
def cifar_root() -> Path:
    """The CIFAR-10 test images as JPEG folders (skips the test where they are absent)."""
    path = SHARED_DATA / "cifar10-test-jpg"
    if not path.is_dir():
        pytest.skip(f"real photos need {SHARED_DATA}/cifar10-test-jpg (a folder per class)")
    return path
