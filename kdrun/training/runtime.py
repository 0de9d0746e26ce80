"""Where and how to compute: device, AMP, memory format, torch.compile, determinism, and per-epoch peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from kdrun.core.errors import KdrunError

log = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
CHANNELS_LAST_CHOICES = ("auto", True, False)
COMPILE_BACKEND = "inductor"  # tests swap in a failing backend to check the fallback
# cuBLAS is deterministic with a fixed workspace per handle: one of NVIDIA's two settings, read before its first call.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
_NO_DETERMINISTIC_OP = re.compile(r"^(\S+) does not have a deterministic implementation")


@dataclass(frozen=True)
class Runtime:
    """The resolved ``device``, ``amp``, ``channels_last``, ``compile`` and ``deterministic`` settings of a run."""

    device: torch.device
    amp: str = "off"  # off | bf16 | fp16
    progress: bool = False
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device, in channels_last memory format when that is on (in place; returned)."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # only 4-d weights (convolutions) change
        return model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch in the memory format the prepared models expect."""
        if self.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``model`` itself, or with ``compile`` its torch.compile'd forward (one per model, reused across calls)."""
        if not self.compile:
            return model
        compiled = _COMPILED.get(model)
        if compiled is None:
            compiled = _COMPILED[model] = CompiledOrEager(model)
        return compiled


class CompiledOrEager:
    """``torch.compile(model)``; if compiling or running it fails, warn once and run the model eagerly from then on.

    A real error in the model fails eagerly too, so it still surfaces, with its own traceback.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.compiled: Callable | None = torch.compile(model, backend=COMPILE_BACKEND)

    @property
    def eager(self) -> bool:
        return self.compiled is None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, the eager call re-raises real bugs
                cause: BaseException = e
                while (inner := getattr(cause, "inner_exception", None) or cause.__cause__) is not None:
                    cause = inner  # dynamo wraps the backend's own error
                log.warning(
                    "compile=true: torch.compile failed for %s (%s: %s); running it without compiling",
                    type(self.model).__name__,
                    type(cause).__name__,
                    (str(cause).strip().splitlines() or [""])[0][:300],
                )
                self.compiled = None
        return self.model(x)


_COMPILED: weakref.WeakKeyDictionary[nn.Module, CompiledOrEager] = weakref.WeakKeyDictionary()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is emulated and slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it: no page faults on every step's activations.

    By default each large CPU tensor is a fresh mmap whose pages the kernel zeroes on first touch, which costs
    more than the arithmetic for small models (measured: small_cnn's training step 1.5x faster). Returns whether
    it applied (glibc on Linux only).
    """
    global _KEEPING_FREED_MEMORY
    if not _KEEPING_FREED_MEMORY and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
            mallopt.argtypes = (ctypes.c_int, ctypes.c_int)  # an out-of-range value raises instead of wrapping
            m_trim_threshold, m_mmap_threshold, int_max = -1, -3, 2**31 - 1
            # Heap blocks instead of one mmap per large tensor, and never trim the heap's top back to the kernel.
            _KEEPING_FREED_MEMORY = bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, int_max))
    return _KEEPING_FREED_MEMORY


_KEEPING_FREED_MEMORY = False


def resolve_runtime(
    device: str = "auto",
    amp: str = "auto",
    progress: Any = "auto",
    channels_last: Any = "auto",
    compile: bool = False,
    deterministic: bool = False,
) -> Runtime:
    """Resolve the ``auto`` settings for this machine; a GPU-only choice on CPU degrades with a warning.

    ``amp=auto``: bf16 on GPUs that support it, else fp16 (with GradScaler); on CPU bf16 where the CPU has native
    bf16 units, else off. ``channels_last=auto``: on, except on MPS. ``deterministic``: see ``use_deterministic``.
    """
    dev = resolve_device(str(device))
    amp = resolve_amp(str(amp), dev)
    if channels_last not in CHANNELS_LAST_CHOICES:
        raise KdrunError(f"channels_last={channels_last!r} is invalid; choose one of: auto, true, false")
    if channels_last == "auto":
        channels_last = dev.type != "mps"
    if dev.type == "cpu":
        keep_freed_memory()
    use_deterministic(bool(deterministic), dev)
    if progress == "auto":
        progress = sys.stdout.isatty()  # bars only when a person watches the output
    return Runtime(dev, amp, bool(progress), bool(channels_last), bool(compile), bool(deterministic))


def use_deterministic(on: bool, dev: torch.device) -> None:
    """Set PyTorch's process-wide determinism for a run (both ways: an earlier run in this process may have set it).

    On: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic implementation raises, see
    ``determinism_errors``), cuDNN's deterministic kernels without autotuning, and ``CUBLAS_WORKSPACE_CONFIG``
    (unless already set) before the run's first cuBLAS call. Off: cuDNN autotunes its kernels on CUDA (the
    input sizes are fixed, so it tunes once).
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    # Only when it changes: the call imports torch._inductor's config (and torch._dynamo with it), about 1.5 s, to
    # set a flag that a fresh process already has off. A run that trains imports torch._dynamo later anyway (the
    # first torch.optim optimizer does); a command refused before that does not.
    if torch.are_deterministic_algorithms_enabled() != on or torch.is_deterministic_algorithms_warn_only_enabled():
        torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = dev.type == "cuda" and not on


def determinism_error(e: BaseException) -> KdrunError | None:
    """The one-line error for what ``deterministic=true`` refused (an op with no deterministic implementation on
    this device, named when PyTorch names it), or None for any other error."""
    lines = str(e).strip().splitlines()
    if not isinstance(e, RuntimeError) or not lines or "deterministic" not in lines[0].lower():
        return None
    op = _NO_DETERMINISTIC_OP.match(lines[0])
    what = f"{op.group(1)} has no deterministic implementation" if op else lines[0].split(". ")[0][:300]
    return KdrunError(f"deterministic=true: {what} on this device; deterministic=false allows it")


@contextmanager
def determinism_errors(on: bool) -> Iterator[None]:
    """With ``on``, what ``torch.use_deterministic_algorithms`` refuses becomes ``determinism_error``'s one line."""
    try:
        yield
    except RuntimeError as e:
        translated = determinism_error(e) if on else None
        if translated is None:
            raise
        raise translated from e


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda, mps or cpu, whichever is there first; a named device that is not there is an error."""
    if device == "auto":
        mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        device = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise KdrunError(f"device={device!r} is invalid; choose one of: auto, cpu, cuda, cuda:N, mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdrunError(f"device={device} but no CUDA GPU is available; use device=auto or device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise KdrunError(f"device={device} but only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise KdrunError(f"device={device} but MPS is not available; use device=auto or device=cpu")
    return dev


def resolve_amp(amp: str, dev: torch.device) -> str:
    """``auto`` -> the fastest safe precision on ``dev``; fp16 off CUDA degrades to bf16 with a warning."""
    if amp not in AMP_CHOICES:
        raise KdrunError(f"amp={amp!r} is invalid; choose one of: {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        if dev.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if dev.type == "cpu" and cpu_has_native_bf16() else "off"
    if amp == "fp16" and dev.type != "cuda":
        log.warning("amp=fp16 needs a CUDA GPU (GradScaler); using bf16 autocast on %s instead", dev.type)
        return "bf16"
    return amp


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator peak, or on Linux the process's peak resident memory (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: GPU tensors on CUDA, else the process's peak RSS (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    import resource  # not Linux: the peak of the whole process, never reset

    bytes_per_unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * bytes_per_unit / 2**20
