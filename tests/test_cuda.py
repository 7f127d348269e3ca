"""The CUDA paths in one command: fp16 + grad scaler, bf16, --compile, channels_last, DataParallel on
one GPU, DDP over NCCL with one process, and sampling. Skipped without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint
from device import resolve_amp
from helpers import TINY, blobs, fit, tiny_config
from sampling import load_for_sampling, sample_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]


def run(tmp: Path, **overrides) -> dict:
    """Two tiny epochs on the GPU; returns the last checkpoint."""
    fit(tiny_config(tmp, device="cuda", **overrides), TINY, blobs(), blobs(24, seed=1))
    return load_checkpoint(tmp / "ck" / "last.pth")


def test_auto_amp_matches_the_gpu():
    native = torch.cuda.get_device_capability()[0] >= 8
    assert resolve_amp("auto", torch.device("cuda")) == ("bf16" if native else "fp16")


def test_fp16_trains_with_a_live_grad_scaler(tmp_path):
    ckpt = run(tmp_path, amp="fp16")
    assert ckpt["step"] == 12 and ckpt["scaler_state"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in ckpt["model_state"].values())


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8, reason="no native bf16")
def test_bf16_trains(tmp_path):
    ckpt = run(tmp_path, amp="bf16")
    assert ckpt["step"] == 12 and all(torch.isfinite(v).all() for v in ckpt["model_state"].values())


def test_channels_last_trains_and_computes_what_nchw_computes(tmp_path):
    ckpt = run(tmp_path, channels_last="on")
    conv = ckpt["model_state"]["stem.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(conv).all()
    from unet import ConditionalUNet

    model = ConditionalUNet(TINY).cuda().eval()
    x, t = torch.randn(4, 1, 8, 8, device="cuda"), torch.rand(4, device="cuda")
    y = torch.tensor([0, 1, 2, 0], device="cuda")
    with torch.no_grad():
        nchw = model(x, t, y)
        nhwc = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-3, atol=1e-3)


def test_compile_trains_and_saves_without_prefix(tmp_path):
    ckpt = run(tmp_path, compile=True)
    assert ckpt["step"] == 12 and not any(k.startswith("_orig_mod.") for k in ckpt["model_state"])


def test_dataparallel_on_one_gpu(tmp_path):
    ckpt = run(tmp_path, parallel="dp")
    assert not any(k.startswith("module.") for k in ckpt["model_state"])


def test_ddp_over_nccl_with_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), "cuda"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(tmp_path / "ck" / "last.pth")["step"] == 12


def test_sampling_on_the_gpu_matches_the_cpu(tmp_path):
    run(tmp_path)
    gpu = sample_model(load_for_sampling(tmp_path / "best.pth", steps=4, device="cuda").model, 6, seed=3)
    cpu = sample_model(load_for_sampling(tmp_path / "best.pth", steps=4, device="cpu").model, 6, seed=3)
    assert gpu.images.shape == (6, 1, 8, 8) and gpu.nfe == 8
    torch.testing.assert_close(gpu.images, cpu.images, rtol=0, atol=2e-3)  # the same noise: the same images
