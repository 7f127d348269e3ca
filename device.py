"""Where the code runs: the device a name resolves to, and the fast settings each device supports.

`--device auto` means CUDA, else Apple's MPS, else the CPU, for training and sampling alike.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

_kept = False  # whether keep_freed_memory has run in this process


def keep_freed_memory() -> None:
    """Let glibc keep freed tensors for reuse instead of returning them to the OS (Linux; elsewhere nothing).

    glibc serves blocks over 32 MB with mmap and unmaps them on free, so every batch of a large sampling,
    training or Inception pass would page-fault its activations in afresh, spending up to half its CPU time
    in the kernel (docs/cpu-performance.md). Process-wide and idempotent: sampling, training and the
    Inception call it themselves, so a notebook gets it as the scripts do. Memory stays at its peak instead.
    """
    global _kept
    if _kept:
        return
    _kept = True
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):  # musl has no mallopt
        m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**31 - 1)


def mps_available() -> bool:
    """Apple-silicon GPU through Metal (False on builds without MPS)."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """torch.device for auto | cpu | cuda | cuda:N | mps; a clear ValueError when it is absent here."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but no CUDA GPU is visible: use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible (cuda:0 ...)")
    elif device.type == "mps" and not mps_available():
        raise ValueError(f"--device {name} asked for, but Apple's MPS is not available here: use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")  # environment variables that cap PyTorch's CPU kernels


def isa_caps() -> str:
    """The ISA caps in force (e.g. "ATEN_CPU_CAPABILITY=avx2"), or "" when PyTorch may use all that the CPU has."""
    return " ".join(f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name))


def cpu_has_amx() -> bool:
    """Intel AMX tiles, unless an ISA cap keeps PyTorch from them (the machine then stands in for an older class)."""
    return not isa_caps() and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def cpu_native_bf16() -> bool:
    """bf16 arithmetic in hardware, uncapped: AMX, or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later).

    There bf16 autocast is faster than fp32; elsewhere it is emulated, ~18x slower on an AVX2 EPYC.
    """
    return cpu_has_amx() or (not isa_caps() and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def cpu_class() -> str:
    """The CPU's vector class as PyTorch uses it: AMX, AVX-512, AVX2 (speeds hold per class), or what torch reports."""
    if cpu_has_amx():
        return "AMX"
    capability = torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512, DEFAULT (ARM: NEON/SVE names)
    return {"AVX512": "AVX-512"}.get(capability, capability)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform.processor())."""
    import platform

    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores (compute capability >= 8.0, Ampere on). T4 and V100 only emulate bf16: slow or failing convs."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_amp(amp: str, device: torch.device) -> str:
    """The autocast dtype --amp gives on this device: none | bf16 | fp16.

    auto = bf16 on GPUs with native bf16 and on CPUs with hardware bf16 (AMX, AVX512-BF16); fp16 (with
    the grad scaler) on older GPUs; none elsewhere. fp16 on the CPU is slower than fp32, so it is a no-op
    there, and MPS runs fp32 unless asked (its autocast coverage differs between macOS releases).
    """
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_native_bf16(device) else "fp16"
        return "bf16" if device.type == "cpu" and cpu_native_bf16() else "none"
    if device.type == "cpu" and amp == "fp16":
        return "none"
    return amp


def resolve_compile(compile_: bool, device: torch.device) -> bool:
    """Whether --compile runs here: TorchInductor's MPS backend is a prototype, so MPS runs eagerly, with a note."""
    if compile_ and device.type == "mps":
        print("--compile: not supported on MPS here; running the model eagerly")
        return False
    return compile_


def resolve_channels_last(channels_last: str, device: torch.device, amp: str) -> bool:
    """Whether --channels-last gives NHWC here.

    auto = on for GPUs and for fp32 on AVX-512 CPUs (155 vs 127 img/s on the cpu preset); off with
    bf16 on the CPU, where GroupNorm is ~4x slower in NHWC, on AVX2 CPUs, where NHWC convolution
    backward and GroupNorm are slower (cpu preset: 99-105 vs 92-96 img/s), and on MPS, where NHWC
    convolutions have been slower and less tested than NCHW.
    """
    if channels_last != "auto":
        return channels_last == "on"
    if device.type == "cpu":
        return amp != "bf16" and cpu_class() in ("AVX-512", "AMX")
    return device.type != "mps"


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size."""

    device: torch.device
    rank: int = 0
    world: int = 1
    ddp: bool = False

    @property
    def main(self) -> bool:
        """Only the main process prints and writes files."""
        return self.rank == 0


def launched_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) under plain python."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The GPU of this process on its node (one GPU per rank); CPU ranks share the CPU."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def setup_runtime(device_name: str, parallel: str) -> Runtime:
    """Resolve the device; join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    rank, world, local_rank = launched_ranks()
    if world > 1 and parallel != "auto":
        # none would make every process rank 0 on one device, all writing the same files; dp is not DDP.
        raise ValueError(f"--parallel {parallel} cannot run under torchrun ({world} processes): "
                         "use --parallel auto (DDP), or launch with plain python for --parallel none/dp")
    device = resolve_device(device_name)
    if world == 1:
        return Runtime(device)
    device = rank_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise ValueError("DDP on Apple MPS is not supported: train with plain python (one process)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world, ddp=True)


def configure_backends(deterministic: bool) -> None:
    """TF32 and cudnn.benchmark for speed, unless deterministic kernels are asked for."""
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
