"""Triton kernels compiled ahead of time for a named card, without a GPU: their footprint on it.

A launch recorded by `dispatch.recording` (the Triton implementation called on meta tensors: the
grid, arguments and constexprs the dispatcher chose) is compiled at every autotune config it may run
at, for the card's architecture: `triton.compile` takes it through TTIR, TTGIR, LLVM IR and PTX to a
cubin (ptxas from the triton wheel), with the argument specialisation (dtypes, 16-byte alignment,
ints equal to 1) made by triton's own binder, as at a real launch. `cuobjdump --dump-resource-usage`
then reads the cubin's registers and local memory; the shared memory is Triton's `metadata.shared`,
what a launch asks for and what Triton checks against the device's limit before running it.
Needs the triton wheel's nvidia backend binaries (ptxas, cuobjdump); `missing_tools()` names what is
absent.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from zoo.kernels.dispatch import Launch

GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA: grid.x, grid.y, grid.z
MAX_THREADS = 1024  # per block


@dataclass(frozen=True)
class Card:
    """A GPU to compile for: compute capability ×10, SMs (the split-K choice reads them) and the shared
    memory one block may use (opt-in maximum)."""

    name: str
    arch: int
    multiprocessors: int
    shared_limit: int


CARDS = {"sm_90": Card("H100/H200", 90, 132, 227 * 1024), "sm_80": Card("A100", 80, 108, 163 * 1024)}


@dataclass(frozen=True)
class Footprint:
    """One launch at one config, compiled for one card."""

    kernel: str  # the Triton function's name
    constexprs: dict  # the dispatcher's constexprs beside the config's (GATHER, PRECISION, BLOCK_M)
    config: str  # the autotune config (`config_name`)
    signature: dict  # argument types as Triton specialised them (`*bf16`, `i32`, `constexpr`)
    card: str
    registers: int  # per thread
    shared: int  # bytes per block
    spills: int  # bytes of local memory per thread (cuobjdump STACK + LOCAL: Triton kernels make no calls)
    threads: int  # per block
    grid: tuple[int, int, int]
    cubin: int  # bytes
    issues: list[str] = field(default_factory=list)


def missing_tools() -> str | None:
    """None when kernels can be compiled and measured here; else one line naming what is missing."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton with its nvidia backend is not importable ({e})"
    missing = []
    for name, tool in (("ptxas (sm_80)", lambda: get_ptxas(80)), ("ptxas (sm_90)", lambda: get_ptxas(90)),
                       ("cuobjdump", lambda: knobs.nvidia.cuobjdump)):
        try:
            tool()
        except RuntimeError:
            missing.append(name)
    if missing:
        bin_dir = Path(knobs.__file__).parent / "backends" / "nvidia" / "bin"
        return f"{', '.join(missing)} not found (triton looks in {bin_dir} and TRITON_<TOOL>_PATH)"
    return None


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the one function in `cubin`, from `cuobjdump --dump-resource-usage`."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
                              capture_output=True, text=True, check=True).stdout
    found = re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)
    if not found:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {k: int(v) for k, v in found}


# (source hash, options hash) -> registers, shared bytes, spilled bytes, cubin bytes: shapes share most compiles
_compiled: dict[tuple, tuple[int, int, int, int]] = {}


def _compile(fn, signature: dict, constexprs: dict, attrs: dict, options, target) -> tuple[int, int, int, int]:
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature, constexprs, attrs)
    key = (src.hash(), options.hash())
    if key not in _compiled:
        kernel = triton.compile(src, target=target, options=options.__dict__)
        cubin = kernel.asm["cubin"]
        usage = resource_usage(cubin)
        _compiled[key] = (usage["REG"], kernel.metadata.shared, usage["STACK"] + usage["LOCAL"], len(cubin))
    return _compiled[key]


def footprints(launch: Launch, card: Card) -> list[Footprint]:
    """`launch` compiled for `card` at every config the autotuner would try for it (`Launch.configs`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.tuned.kernel
    target = GPUTarget("cuda", card.arch, 32)
    backend = make_backend(target)
    bind = create_function_from_signature(fn.signature, fn.params, backend)  # the JIT's own specialisation
    rows = []
    with warnings.catch_warnings():  # triton 3.9 warns that its fp-fusion default will change (the JIT would too)
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        for config in launch.configs():
            meta = {**launch.constexprs, **config.all_kwargs()}
            bound, specialization, options = bind(*launch.args, **meta)
            options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, specialization, options)
            registers, shared, spills, cubin = _compile(fn, signature, constexprs, attrs, options, target)
            grid = tuple(launch.grid({**launch.named_args(), **meta}))
            row = Footprint(fn.__name__, launch.constexprs, config_name(config), signature, card.name, registers,
                            shared, spills, config.num_warps * 32, grid + (1,) * (3 - len(grid)), cubin)
            row.issues.extend(limit_issues(row, card))
            rows.append(row)
    return rows


def config_name(config) -> str:
    """A triton.Config in a few characters: `BLOCK_N=128 BLOCK_K=64 w4 s3` (its meta-parameters, warps, stages)."""
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"w{config.num_warps}", f"s{config.num_stages}"])


def limit_issues(row: Footprint, card: Card) -> list[str]:
    """What in `row` would stop it from launching on `card` (or run slowly: spills); empty when nothing."""
    issues = []
    if row.cubin <= 0:
        issues.append("no cubin")
    if row.shared > card.shared_limit:
        issues.append(f"shared {row.shared} B > {card.shared_limit} B per block on {card.name}")
    if row.spills:
        issues.append(f"spills {row.spills} B of local memory per thread")
    if row.threads > MAX_THREADS:
        issues.append(f"{row.threads} threads per block > {MAX_THREADS}")
    for axis, size, limit in zip("xyz", row.grid, GRID_LIMITS):
        if not 1 <= size <= limit:
            issues.append(f"grid.{axis} = {size} outside 1..{limit}")
    return issues
