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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
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
    """Import zoo.kernels.<name> (the module that imports triton), checking it can run on `device` (any device
    inside `recording`, where nothing runs)."""
    if not triton_available():
        raise KernelUnavailable("the triton package is not installed (it is a Linux-only dependency)")
    if device.type != "cuda" and not interpreting() and _RECORDING.get() is None:
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


@dataclass(frozen=True)
class Launch:
    """A Triton launch recorded inside `recording` (nothing ran): what the dispatcher chose for these operands."""

    tuned: Tuned
    grid: Callable[[dict], tuple[int, ...]]  # of the meta-parameters, as triton calls it
    args: tuple
    constexprs: dict

    def named_args(self) -> dict:
        return dict(zip(self.tuned.kernel.arg_names, self.args))

    def configs(self) -> list:
        """The autotune configs the autotuner would try for this launch."""
        return self.tuned.configs_for(self.named_args(), self.constexprs)


class _Recording:
    def __init__(self, multiprocessors: int):
        self.multiprocessors, self.launches = multiprocessors, []


_RECORDING: ContextVar[_Recording | None] = ContextVar("zoo_triton_recording", default=None)


@contextmanager
def recording(multiprocessors: int) -> Iterator[list[Launch]]:
    """Inside, Triton launches are recorded into the yielded list instead of run, as on a GPU with
    `multiprocessors` SMs: call the Triton implementations on meta tensors to see what they would launch
    (zoo/kernels/aot.py compiles it ahead of time)."""
    rec = _Recording(multiprocessors)
    token = _RECORDING.set(rec)
    try:
        yield rec.launches
    finally:
        _RECORDING.reset(token)


class Tuned:
    """`launcher[grid](*args, **constexprs)` of a Triton kernel. On CUDA `triton.autotune` over the `configs`
    that `fits(config, named_args, constexprs)` keeps for the operands (keyed on `key` and the operands'
    dtypes); in the interpreter the kernel at the `fixed` meta-parameters; inside `recording()` the launch
    is recorded, not run. `configs_for` is the one choice of configs: the autotuner prunes with it and
    the ahead-of-time compile (zoo/kernels/aot.py) compiles what it returns."""

    def __init__(self, kernel, configs: list, key: list[str], fixed: dict,
                 fits: Callable[..., bool] | None = None):
        self.kernel, self.configs, self.fixed, self.fits = kernel, configs, fixed, fits
        self._autotuned = None
        if not interpreting():
            import triton

            prune = {"early_config_prune": lambda _, named_args, **constexprs: self.configs_for(named_args, constexprs)}
            self._autotuned = triton.autotune(configs=configs, key=key, prune_configs_by=prune)(kernel)

    def configs_for(self, named_args: dict, constexprs: dict) -> list:
        """The configs that can launch on these operands (all of them when `fits` is None)."""
        return [c for c in self.configs if self.fits is None or self.fits(c, named_args, constexprs)]

    def __getitem__(self, grid):
        rec = _RECORDING.get()
        if rec is not None:
            return lambda *args, **constexprs: rec.launches.append(Launch(self, grid, args, constexprs))
        if self._autotuned is None:
            return lambda *args, **kwargs: self.kernel[grid(self.fixed)](*args, **kwargs, **self.fixed)
        return self._autotuned[grid]


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; inside `recording`, of the card recorded for; else 2 (the interpreter's small grid)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    rec = _RECORDING.get()
    return rec.multiprocessors if rec is not None else 2


def split_k(device: torch.device, programs: int, k: int) -> int:
    """Split K so that there are ~4 programs per multiprocessor (decode has few rows × column blocks)."""
    return max(1, min(-(-4 * multiprocessors(device) // max(programs, 1)), -(-k // 64)))
