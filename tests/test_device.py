"""--device: auto picks CUDA, then Apple MPS, then the CPU; an absent device is a clear error (availability faked)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import device
from device import resolve_device


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(device, "mps_available", lambda: mps)
    assert resolve_device("auto") == resolve_device(None) == torch.device(expected)


@pytest.mark.parametrize("name,message", [
    ("cuda", "no CUDA GPU is visible: use --device cpu"),
    ("cuda:1", "no CUDA GPU is visible"),
    ("mps", "MPS is not available here"),
    ("tpu", "unknown device 'tpu'"),
])
def test_absent_or_unknown_devices_are_clear_errors(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "mps_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


def test_a_gpu_index_beyond_the_visible_ones_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="only 1 CUDA GPU"):
        resolve_device("cuda:1")


FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from cpu import keep_freed_memory
    keep_freed_memory()
elif sys.argv[1] == "library":  # what a notebook does: import the library and sample, no script's main()
    from sampling import sample_model
    from solvers import Sampler
    from unet import ConditionalUNet, ModelConfig
    cfg = ModelConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,), num_classes=None)
    sample_model(ConditionalUNet(cfg).eval(), 1, sampler=Sampler(steps=1))
for _ in range(20):  # a 64 MB tensor, allocated and freed: page faults of each round
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24).sum()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_large_tensors_page_faulting_on_every_reuse():
    def faults(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent.parent)
        return [int(line) for line in out.stdout.split()]

    default, kept, library = faults("default"), faults("keep"), faults("library")
    assert min(default) > 16_000  # every round faults the tensor's 16,384 pages in again
    assert sum(f < 1_000 for f in kept) >= 12, kept  # reused once glibc's heap has settled (3-8 rounds seen)
    assert sum(f < 1_000 for f in library) >= 12, library  # sampling from the library set it up itself


@pytest.mark.parametrize("build,reason", [(None, "is a CPU-only build"),
                                          ("13.0", "built for CUDA 13.0, which the installed")])
def test_a_gpu_that_pytorch_cannot_use_is_named_before_the_cpu_runs(monkeypatch, capsys, build, reason):
    """An NVIDIA driver is present (faked: nvidia-smi on the PATH) but torch sees no CUDA: auto says why, once per
    call, and --device cuda's error names the reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "mps_available", lambda: False)
    monkeypatch.setattr(device.shutil, "which", lambda cmd: "/usr/bin/nvidia-smi" if cmd == "nvidia-smi" else None)
    monkeypatch.setattr(torch.version, "cuda", build)
    assert resolve_device("auto") == torch.device("cpu")
    err = capsys.readouterr().err
    assert "this machine has an NVIDIA GPU, but" in err and reason in err and "TORCH_INDEX" in err
    with pytest.raises(ValueError, match=f"no CUDA GPU is visible \\(this PyTorch .*{reason.split()[-1]}"):
        resolve_device("cuda")
    monkeypatch.setattr(device.shutil, "which", lambda cmd: None)
    monkeypatch.setattr(device.os.path, "exists", lambda path: False)
    resolve_device("auto")
    assert capsys.readouterr().err == ""  # no NVIDIA driver: nothing to say
