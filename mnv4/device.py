"""Device and precision, chosen in one place: which device, which autocast dtype, which memory layout; random
state and peak memory per device type; what the machine is called.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from .errors import UserError
from .model import ATTENTION_VARIANTS

DEVICES = ("auto", "cpu", "cuda", "mps")


AMP_MODES = ("auto", "bf16", "fp16", "off")


def select_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """auto: MPS, then CUDA, then CPU (CUDA, then CPU under torchrun: MPS has no distributed backend).
    An explicit device that is not available is a user error. Under torchrun each process takes cuda:LOCAL_RANK."""
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if local_rank is not None and name == "mps":
        raise UserError(
            "--device mps cannot run under torchrun: PyTorch's distributed backends (gloo, nccl) do not "
            "take MPS tensors; run the script without torchrun"
        )
    if local_rank is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise UserError(
                f"torchrun started a process of local rank {local_rank} but this node has {gpus} GPU(s): "
                f"use --nproc-per-node {gpus} or fewer (one process per GPU)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "auto":
        return torch.device("mps" if mps_ok and local_rank is None else "cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to PyTorch; use --device cpu (or auto)")
    if name == "mps" and not mps_ok:
        raise UserError("--device mps: the Apple MPS backend is not available here; use --device cpu (or auto)")
    if name not in DEVICES:
        raise UserError(f"unknown --device {name!r}; choose from {', '.join(DEVICES)}")
    return torch.device(name)


# The first torch release (major, minor) where each MPS feature a run may use works, and why earlier ones fail.
MPS_NEEDS = {
    # GradScaler.unscale_ took the scale's reciprocal in float64, which MPS lacks, and the unscale kernels had no
    # MPS version (pytorch/pytorch#142397).
    "fp16": ((2, 8), "GradScaler cannot unscale on MPS before it"),
    # MPS autocast arrived in 2.5 for float16 only: bf16 there is turned off with a warning and the run is fp32.
    "bf16": ((2, 6), "MPS autocast runs bf16 as fp32 before it"),
    # torch.mps.set_rng_state dropped the Philox offset (pytorch/pytorch#130613), so dropout and drop-path masks
    # after a resume differed from the uninterrupted run's.
    "resume": ((2, 5), "torch.mps.set_rng_state does not restore the Philox offset before it"),
    # The attention's key/value projections get their gradients transposed (channels_last strides); torch 2.5's MPS
    # convolution backward gave wrong input gradients for those on macOS 13-14 and failed on macOS 15
    # (pytorch/pytorch#142344, fixed by #143196); earlier releases are not verified here.
    "attention": ((2, 6), "its convolution backward gave the attention blocks wrong gradients before it"),
}


def torch_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a torch version string ("2.5.0a0+git1234" is 2.5); the running torch by default."""
    found = re.match(r"(\d+)\.(\d+)", version or torch.__version__)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def mps_supports(feature: str) -> tuple[bool, str]:
    """Whether the running torch has a working MPS `feature` (a key of MPS_NEEDS), and if not, a sentence naming
    the torch release that has it."""
    (major, minor), why = MPS_NEEDS[feature]
    if torch_release() >= (major, minor):
        return True, ""
    return False, f"needs torch {major}.{minor} or later on MPS ({why}); this is torch {torch.__version__}"


def autocast_dtype(device: torch.device, amp: str):
    """Mixed-precision dtype for autocast, or None for fp32. auto: bf16 on GPUs that have it natively (compute
    capability 8.0 and up), fp16 on older ones, fp32 off CUDA: on the CPU autocast measured slower than fp32
    (docs/PERFORMANCE.md), and MPS autocast is unmeasured here. torch.cuda.is_bf16_supported() alone counts
    emulation, which a T4 or V100 offers but runs far slower than fp16 (cuDNN has no bf16 convolutions there).
    An MPS mode the running torch (or macOS) would silently run as fp32, or fail in, is refused in one line."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type == "mps":
        supported, reason = mps_supports(amp)
        if not supported:
            raise UserError(f"--amp {amp} {reason}: upgrade torch, or use --amp off")
        if amp == "bf16" and not torch.backends.mps.is_macos_or_newer(14, 0):
            raise UserError("--amp bf16 on MPS needs macOS 14 or later (torch runs it as fp32 before): use --amp off")
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        if amp == "bf16":
            raise UserError(
                "--amp bf16: this GPU has no native bfloat16 (compute capability below 8.0); use "
                "--amp fp16 or --amp auto"
            )
        return torch.float16
    return torch.bfloat16


def precision_context(device: torch.device, dtype: torch.dtype | None):
    """The context a forward pass runs in: autocast to `dtype`, or nothing at all for fp32. No autocast object is
    built for fp32: before torch 2.5 `torch.autocast("mps", enabled=False)` raises in its constructor."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def check_precision(device: torch.device, dtype: torch.dtype | None):
    """Refuse, in one line, an autocast that torch turns off with a warning: the run would be fp32 while its
    config.json says otherwise."""
    if dtype is None:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with precision_context(device, dtype):
            active = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == dtype
    if not active:
        said = next((str(w.message).splitlines()[0] for w in caught), "autocast stayed off")
        raise UserError(
            f"--amp {AMP_NAMES.get(dtype, dtype)}: torch {torch.__version__} does not autocast {device.type} to "
            f"{dtype} ({said}); use --amp off"
        )


AMP_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def reduced_precision(device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype a benchmark's reduced-precision rows time on `device` (bf16; fp16 on a GPU without
    native bf16, as --amp auto picks), or (None, why) where this torch or device would run them as fp32 or fail."""
    try:
        dtype = autocast_dtype(device, "auto" if device.type == "cuda" else "bf16")
        check_precision(device, dtype)
    except UserError as exc:
        return None, str(exc)
    return dtype, ""


def check_exact_resume(device: torch.device):
    """A mid-epoch checkpoint resumes exactly only where the device's random state can be restored."""
    if device.type == "mps":
        supported, reason = mps_supports("resume")
        if not supported:
            raise UserError(
                f"resuming mid-epoch {reason}, so the rest of the epoch would not match an uninterrupted run: "
                "upgrade torch"
            )


def device_warnings(device: torch.device, args) -> list[str]:
    """One line for each option the user forced that PyTorch documents as risky on this device."""
    warnings_ = []
    if device.type == "mps" and args.compile:
        warnings_.append(
            "--compile on MPS is a prototype in PyTorch, with known failures in backward: drop "
            "--compile if training fails or its losses look wrong"
        )
    return warnings_


def check_mps_training(device: torch.device, variant: str):
    """Refuse, in one line, training a variant with attention blocks on an MPS torch that computes their gradients
    wrongly (MPS_NEEDS["attention"])."""
    if device.type != "mps" or variant not in ATTENTION_VARIANTS:
        return
    supported, reason = mps_supports("attention")
    if not supported:
        raise UserError(
            f"training {variant} (attention blocks) on MPS {reason}: upgrade torch, or train a conv_* variant"
        )


# Why channels_last is refused on MPS, in training and evaluation alike: PyTorch's MPS BatchNorm backward gave wrong
# weight gradients for channels_last inputs (silently on macOS 14), its convolution backward mishandled
# channels_last gradients, and its forward convolution read channel slices of channels_last tensors wrongly.
MPS_CHANNELS_LAST = (
    "PyTorch's MPS kernels have computed wrong results for channels_last tensors (BatchNorm and convolution backward: "
    "pytorch/pytorch#175189, #142344; convolution of channel slices: #180984)"
)


def channels_last_allowed(device: torch.device) -> bool:
    """Whether a run (or a benchmark row) may use channels_last on `device`: everywhere but MPS (MPS_CHANNELS_LAST)."""
    return device.type != "mps"


def default_channels_last(device: torch.device) -> bool:
    """channels_last: faster for a Conv-S training step on the CPU (oneDNN; docs/PERFORMANCE.md, model training
    step), and the layout cuDNN prefers for depthwise and 1x1 convs; never on MPS (MPS_CHANNELS_LAST), where its
    convolution backward is also many times slower (pytorch/pytorch#193349)."""
    return channels_last_allowed(device)


def synchronize(device: torch.device):
    """Wait for queued kernels, so wall-clock timings measure work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device):
    """Start the run's CUDA peak here: main() may run more than once in a process (tests, a notebook)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory of the run in MiB: CUDA's allocator peak since the run started, the CPU process's peak resident
    set (a script's run is its process); None on MPS, where PyTorch keeps no peak (its current allocation would
    understate it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return None
    try:  # CPU: the process's peak resident set (Linux)
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        import resource  # the process's lifetime peak: KiB on Linux, bytes on macOS

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def rng_state(device: torch.device) -> dict:
    """This process's random state: the CPU generator and the training device's own (dropout and drop-path masks
    are drawn there; not every visible GPU's, so a checkpoint resumes on a machine with fewer GPUs, or on another
    device type)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device):
    """Restore `rng_state`'s result; a device state from another device type is not applicable and is skipped."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def seed_everything(seed: int, deterministic: bool):
    torch.manual_seed(seed)  # seeds CPU, CUDA and MPS generators (model init, dropout, stochastic depth)
    # cuDNN's autotuner picks the fastest convolution for each shape; CIFAR's shapes never change, so it pays for
    # its first-step search at once (torchvision's references do the same). It is not deterministic.
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS needs this for deterministic matmuls; the user's own setting wins.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set either way: several main() calls may share a process, and a --deterministic run must not leave the next
    # one deterministic.
    torch.use_deterministic_algorithms(deterministic)


def device_name(device: torch.device) -> str:
    """What a run's figures were measured on: the GPU's name, the Mac's chip (MPS), or the CPU with the vector
    instructions torch's kernels use and the threads it runs (one CPU name can cover machines with and without
    AVX-512, which train at different speeds)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"{cpu_model()} (MPS)"
    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


def _sysctl(key: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's marketing name: Linux's /proc/cpuinfo, macOS's sysctl ("Apple M4"); platform.processor() gives
    only the architecture on both."""
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string") or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_device(args, dist) -> tuple[torch.device, torch.dtype | None, bool]:
    """A training run's device, autocast dtype (None: fp32) and memory layout, from --device, --amp and
    --channels-last; joins the process group under torchrun and starts the peak-memory count."""
    device = select_device(args.device, dist.local_rank if dist else None)
    if args.sync_bn and device.type != "cuda":
        raise UserError(
            f"--sync-bn needs CUDA (SyncBatchNorm runs on CUDA devices only), not {device.type}: drop --sync-bn"
        )
    if args.channels_last and not channels_last_allowed(device):
        raise UserError(
            f"--channels-last on MPS: {MPS_CHANNELS_LAST}: drop --channels-last (contiguous is the default there)"
        )
    if not args.test_only:
        check_mps_training(device, args.variant)
    amp_dtype = autocast_dtype(device, args.amp)
    check_precision(device, amp_dtype)
    dist.init(device)
    reset_peak_memory(device)
    channels_last = default_channels_last(device) if args.channels_last is None else args.channels_last
    return device, amp_dtype, channels_last
