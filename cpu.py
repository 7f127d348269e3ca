"""What the CPU is and how PyTorch may use it: its vector class, hardware bf16, the ISA caps in force, and the
allocator setting that keeps large tensors from page-faulting afresh on every batch."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys

import torch

ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")  # environment variables that cap PyTorch's CPU kernels
# malloc.h's mallopt parameters: no mmap for large blocks, and never trim the heap back to the OS
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_memory() -> None:
    """Let glibc keep freed tensors for reuse instead of returning them to the OS (Linux; elsewhere nothing). glibc
    serves blocks over 32 MB with mmap and unmaps them on free, so every batch of a large sampling, training or
    Inception pass would page-fault its activations in afresh, spending much of its CPU time in the kernel
    (docs/cpu-performance.md). Process-wide, once (cached): sampling, training and the Inception call it themselves,
    so a notebook gets it as the scripts do. Memory stays at its peak instead."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):  # musl has no mallopt
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def isa_caps() -> str:
    """The ISA caps in force (e.g. "ATEN_CPU_CAPABILITY=avx2"), or "" when PyTorch may use all that the CPU has."""
    return " ".join(f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name))


def cpu_has_amx() -> bool:
    """Intel AMX tiles, unless an ISA cap keeps PyTorch from them (the machine then stands in for an older class)."""
    return not isa_caps() and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def cpu_native_bf16() -> bool:
    """bf16 arithmetic in hardware, uncapped: AMX, or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later). There bf16
    autocast is faster than fp32; elsewhere it is emulated, and far slower (docs/cpu-performance.md)."""
    return cpu_has_amx() or (not isa_caps() and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def cpu_class() -> str:
    """The CPU's vector class as PyTorch uses it: AMX, AVX-512, AVX2 (speeds hold per class), or what torch reports."""
    if cpu_has_amx():
        return "AMX"
    capability = torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512, DEFAULT (ARM: NEON/SVE names)
    return {"AVX512": "AVX-512"}.get(capability, capability)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform.processor())."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
