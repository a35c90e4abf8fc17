"""Which implementation of a kernel runs: Triton on CUDA, the fastest torch path on CPU.

Every kernel has three implementations with one signature: `reference` (plain torch, the
definition), `torch` (the fastest torch path measured on CPU) and `triton`; a kernel that has a
compiled CPU implementation (zoo/kernels/cpu.py) has a fourth, `cpu` (a kernel without one
takes `cpu` as `torch`). `impl="auto"` picks
`triton` for CUDA tensors when Triton imports, `cpu` for CPU tensors when the kernel has one and
it is built, else `torch`. Triton is imported only when a Triton implementation is asked for, so
the CPU path never needs it.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from zoo.errors import ZooError

IMPLS = ("auto", "reference", "torch", "triton", "cpu")
PARALLEL_MIN_WORK = 1 << 18  # CPU: multiply-adds below which splitting one row over threads costs more than it saves


class KernelUnavailable(ZooError):
    """A Triton kernel was asked for where it cannot run (no CUDA and no interpreter)."""


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (Linux with the triton package)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_module(name: str, device: torch.device) -> ModuleType:
    """Import zoo.kernels.<name> (the module that imports triton), checking it can run on `device`."""
    if not triton_available():
        raise KernelUnavailable("the triton package is not installed (it is a Linux-only dependency)")
    if device.type != "cuda" and not interpreting():
        raise KernelUnavailable(f"Triton kernels need CUDA tensors (got {device}) or TRITON_INTERPRET=1")
    return importlib.import_module(f"zoo.kernels.{name}")


def choose(impl: str, device: torch.device, cpu_kernel: bool = False) -> str:
    """Resolve `impl`: 'auto' -> 'triton' on CUDA with Triton; on CPU 'cpu' when `cpu_kernel` (the
    kernel has a compiled CPU implementation that can take these operands), else 'torch'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if device.type == "cuda" and triton_available():
        return "triton"
    return "cpu" if device.type == "cpu" and cpu_kernel else "torch"


def autotune_or_fixed(kernel, configs: list, key: list[str], fixed: dict):
    """On CUDA `triton.autotune(configs, key)(kernel)`; in the interpreter the kernel with `fixed` meta-parameters.

    Both are launched as `launcher[grid](*args)` with `grid` a function of the meta-parameters.
    """
    import triton

    if interpreting():
        return _FixedMeta(kernel, fixed)
    return triton.autotune(configs=configs, key=key)(kernel)


class _FixedMeta:
    """`launcher[grid](*args)` with fixed meta-parameters: the call syntax of an autotuned kernel."""

    def __init__(self, kernel, meta: dict):
        self.kernel, self.meta = kernel, meta

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid(self.meta)](*args, **kwargs, **self.meta)


def split_k(device: torch.device, programs: int, k: int) -> int:
    """Split K so that there are ~4 programs per multiprocessor (decode has few rows × column blocks)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(-(-4 * sms // max(programs, 1)), -(-k // 64)))
