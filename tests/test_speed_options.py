"""--amp and --channels-last: what each resolves to on the CPU, and a bf16 training step there."""
import pytest
import torch

import cpu
import device
from device import Runtime, resolve_amp, resolve_channels_last
from config import check_train_config
from helpers import TINY, tiny_config
from data import Batch
from trainer import build, train_step

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


def resolved(amp: str, layout: str, where: torch.device) -> tuple[str, bool]:
    """What --amp and --channels-last give on a device."""
    mode = resolve_amp(amp, where)
    return mode, resolve_channels_last(layout, where, mode)


@pytest.mark.parametrize("isa,native_bf16,expected", [
    ("AMX", True, ("bf16", False)),  # Intel Sapphire Rapids and later
    ("AVX-512", True, ("bf16", False)),  # AVX512-BF16: AMD Zen 4 and later
    ("AVX-512", False, ("none", True)),  # e.g. Intel Skylake-X / Ice Lake
    ("AVX2", False, ("none", False)),
])
def test_auto_follows_the_cpu_class(monkeypatch, isa, native_bf16, expected):
    monkeypatch.setattr(device, "cpu_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(device, "cpu_class", lambda: isa)
    # bf16 only where hardware bf16 makes it faster, and then NCHW (bf16 GroupNorm is slow in NHWC); fp32 in NHWC
    # where AVX-512 makes it faster, NCHW on AVX2 where it is not
    assert resolved("auto", "auto", CPU) == expected


@pytest.mark.parametrize("flag", ["_is_amx_tile_supported", "_is_avx512_bf16_supported"])
def test_an_isa_cap_turns_hardware_bf16_off(monkeypatch, flag):
    for name in cpu.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flag == "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flag == "_is_avx512_bf16_supported",
                        raising=False)
    assert cpu.cpu_native_bf16() and resolve_amp("auto", CPU) == "bf16"
    # a machine capped to AVX2 stands in for one without hardware bf16: emulated bf16 would be ~18x slower
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu.isa_caps() == "ONEDNN_MAX_CPU_ISA=AVX2"
    assert not cpu.cpu_native_bf16() and not cpu.cpu_has_amx() and resolve_amp("auto", CPU) == "none"


def test_explicit_choices_on_the_cpu(monkeypatch):
    monkeypatch.setattr(device, "cpu_class", lambda: "AVX-512")
    assert resolved("fp16", "auto", CPU) == ("none", True)  # fp16 autocast is a no-op on the CPU
    assert resolved("bf16", "auto", CPU) == ("bf16", False)
    assert resolved("none", "off", CPU) == ("none", False)
    assert resolved("bf16", "on", CPU) == ("bf16", True)  # explicit wins


def test_mps_runs_fp32_nchw_unless_asked():
    assert resolved("auto", "auto", MPS) == ("none", False)
    assert resolved("bf16", "on", MPS) == ("bf16", True)


def test_compile_falls_back_to_eager_on_mps_with_a_note(capsys):
    assert device.resolve_compile(True, MPS) is False and "not supported on MPS" in capsys.readouterr().err
    assert device.resolve_compile(True, CPU) is True and device.resolve_compile(False, CUDA) is False


def test_bad_layout_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--channels-last 'yes'"):
        check_train_config(tiny_config(tmp_path, channels_last="yes"))


def test_bf16_training_step_on_the_cpu(tmp_path):
    cfg = tiny_config(tmp_path, amp="bf16")
    parts = build(cfg, TINY, Runtime(CPU, amp="bf16"))
    with parts.rt.autocast():
        out = parts.net(torch.zeros(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert out.dtype == torch.bfloat16  # autocast is really on
    before = [p.detach().clone() for p in parts.model.parameters()]
    x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (16,))
    loss = train_step(parts, cfg, Batch(x, y), step=0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in parts.model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, parts.model.parameters()))
    assert all(p.is_contiguous() for p in parts.model.parameters() if p.dim() == 4)  # NCHW, not channels_last
    nhwc = build(tiny_config(tmp_path, amp="none", channels_last="on"), TINY, Runtime(CPU, channels_last=True))
    assert not all(p.is_contiguous() for p in nhwc.model.parameters() if p.dim() == 4)  # --channels-last on is NHWC
