"""Where the code runs: the device a name resolves to, the fast settings each device supports, the process group of
a DDP run, and Ctrl-C between steps.

`--device auto` means CUDA, else Apple's MPS, else the CPU, for training and sampling alike.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpu import cpu_class, cpu_native_bf16
from progress import note


def mps_available() -> bool:
    """Apple-silicon GPU through Metal (False on builds without MPS)."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def unused_nvidia_gpu() -> str | None:
    """Why PyTorch cannot use the NVIDIA GPU this machine has (its driver files or nvidia-smi), else None."""
    if torch.cuda.is_available() or not (os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi")):
        return None
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is a CPU-only build"
    return f"this PyTorch is built for CUDA {torch.version.cuda}, which the installed driver does not run (too old?)"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """torch.device for auto | cpu | cuda | cuda:N | mps; a clear ValueError when it is absent here. auto says so in
    one line when an NVIDIA GPU is present but PyTorch cannot use it, before anything runs on the CPU."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if (reason := unused_nvidia_gpu()) and not mps_available():
            note(f"note: this machine has an NVIDIA GPU, but {reason}: running on the CPU. Install "
                 "the PyTorch build its driver runs (README: make setup TORCH_INDEX=...)")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = f" ({reason})" if (reason := unused_nvidia_gpu()) else ""
            raise ValueError(f"--device {name} asked for, but no CUDA GPU is visible{why}: use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible (cuda:0 ...)")
    elif device.type == "mps" and not mps_available():
        raise ValueError(f"--device {name} asked for, but Apple's MPS is not available here: use --device cpu "
                         "(or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def cuda_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores (compute capability >= 8.0, Ampere on); T4 and V100 only emulate bf16 (slow or failing)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_amp(amp: str, device: torch.device) -> str:
    """The autocast dtype --amp gives on this device: none | bf16 | fp16. auto = bf16 on GPUs with native bf16 and on
    CPUs with hardware bf16 (AMX, AVX512-BF16); fp16 (with the grad scaler) on older GPUs; none elsewhere. fp16 on the
    CPU is slower than fp32, so it is a no-op there, and MPS runs fp32 unless asked (its autocast coverage differs
    between macOS releases)."""
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
        note("--compile: not supported on MPS here; running the model eagerly")
        return False
    return compile_


def resolve_channels_last(channels_last: str, device: torch.device, amp: str) -> bool:
    """Whether --channels-last gives NHWC here. auto = on for GPUs and for fp32 on AVX-512 CPUs; off with bf16 on the
    CPU (GroupNorm is much slower in NHWC there), on AVX2 CPUs (NHWC convolution backward and GroupNorm are slower) and
    on MPS (NHWC convolutions less tested). The measurements: docs/cpu-performance.md."""
    if channels_last != "auto":
        return channels_last == "on"
    if device.type == "cpu":
        return amp != "bf16" and cpu_class() in ("AVX-512", "AMX")
    return device.type != "mps"


@dataclass
class Runtime:
    """Where this process runs and how: device, rank and world size, and the speed settings resolved for it."""

    device: torch.device
    rank: int = 0
    world: int = 1
    ddp: bool = False
    amp: str = "none"  # none | bf16 | fp16, as resolved for the device
    channels_last: bool = False  # NHWC inputs and weights
    compile: bool = False  # torch.compile the model

    @property
    def main(self) -> bool:
        """Only the main process prints and writes files."""
        return self.rank == 0

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of this run's inputs and weights: channels_last, or the usual NCHW."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def distributed(self, module: torch.nn.Module) -> torch.nn.Module:
        """module as this run calls a trained network: wrapped for DDP under torchrun (its gradients averaged over
        the ranks), else itself."""
        if not self.ddp:
            return module
        gpu = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=gpu)

    def autocast(self):
        """The bf16/fp16 autocast context of this run, or a no-op."""
        if self.amp == "none":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)


def launched_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) under plain python."""
    return tuple(int(os.environ.get(name, default)) for name, default in
                 (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The GPU of this process on its node (one GPU per rank); CPU ranks share the CPU."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def setup_runtime(device_name: str = "auto", parallel: str = "auto", amp: str = "none", channels_last: str = "auto",
                  compile_: bool = False, deterministic: bool = False) -> Runtime:
    """The one set-up of a run: resolve the device, join the process group under torchrun (WORLD_SIZE > 1), set the
    backends, and resolve autocast, memory format and compile for that device."""
    rank, world, local_rank = launched_ranks()
    if world > 1 and parallel != "auto":
        # none would make every process rank 0 on one device, all writing the same files; dp is not DDP.
        raise ValueError(f"--parallel {parallel} cannot run under torchrun ({world} processes): "
                         "use --parallel auto (DDP), or launch with plain python for --parallel none/dp")
    device = rank_device(resolve_device(device_name), local_rank)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif device.type == "mps":
            raise ValueError("DDP on Apple MPS is not supported: train with plain python (one process)")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    configure_backends(deterministic)
    resolved = resolve_amp(amp, device)
    if amp == "fp16" and resolved == "none" and rank == 0:
        note("--amp fp16: the CPU has no fast fp16 autocast (slower than fp32), so this run trains in fp32")
    return Runtime(device, rank, world, world > 1, resolved, resolve_channels_last(channels_last, device, resolved),
                   resolve_compile(compile_, device))


def configure_backends(deterministic: bool) -> None:
    """TF32 and cudnn.benchmark for speed, unless deterministic kernels are asked for."""
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def global_mean(value: torch.Tensor, rt: Runtime) -> float:
    """Mean of a per-rank scalar over all ranks."""
    if rt.ddp:
        value = value.clone()
        dist.all_reduce(value)
        value /= rt.world
    return value.item()


def global_max(values: list[float], rt: Runtime) -> list[float]:
    """Element-wise maximum of per-rank values over all ranks (the slowest rank's timings)."""
    if not rt.ddp:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


class StopRequest:
    """Ctrl-C as a flag checked between steps, so a checkpoint never holds a half-applied step. A second Ctrl-C
    interrupts at once. Outside the main thread (where signals cannot be caught) it is a no-op."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        note("\nCtrl-C: stopping after this step (press again to quit without saving)")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def agreed(self, rt: Runtime, collective: bool = True) -> bool:
        """Whether any rank was asked to stop: all ranks must leave the loop at the same step. Under DDP that takes an
        all-reduce and a host sync, so the loop asks at its log steps only (collective False: not now)."""
        if not rt.ddp:
            return self.requested
        return collective and bool(global_max([float(self.requested)], rt)[0])


def ignore_sigint(_worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the main process, which stops cleanly between steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
