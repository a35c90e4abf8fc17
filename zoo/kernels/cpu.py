"""zoo's compiled CPU kernels (`csrc/cpu_kernels.cpp`), built once per machine on first use.

The source is compiled with torch's own extension builder (`torch.utils.cpp_extension.load`:
ninja + the system C++ compiler, `-O3 -march=native`, a few seconds) into torch's extension cache,
and its ops are registered as `torch.ops.zoo_cpu.*`. The build is keyed by a hash of the source,
the torch version and this CPU's instruction-set flags, so a changed source, a new torch or
another machine sharing the cache builds its own copy.

Where the build cannot run (no compiler, no ninja, ZOO_CPU_KERNELS=0), `available()` is False,
one line says why, and every caller takes its pure-torch path: the compiled kernels are a speed-up,
never a requirement.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

from zoo.kernels.dispatch import PARALLEL_MIN_WORK, KernelUnavailable

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


class CpuKernelsUnavailable(KernelUnavailable):
    """The compiled CPU kernels were asked for explicitly and cannot be built or loaded here."""


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (part of the build key: the code is compiled for -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_name() -> str:
    key = SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()
    return "zoo_cpu_" + hashlib.sha256(key).hexdigest()[:12]


@functools.cache
def _load() -> str | None:
    """Build (first time) and load the library; None when it works, else the reason it does not."""
    if os.environ.get("ZOO_CPU_KERNELS", "1") in ("0", "", "off", "false"):
        return "ZOO_CPU_KERNELS=0"
    if sys.platform == "win32":
        return "the CPU kernels are built with GCC/Clang flags; not on Windows"
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        compiler = os.environ.get("CXX", "c++")
        if not shutil.which(compiler):
            return f"no C++ compiler ({compiler}) on PATH"
        name = build_name()
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        if not any(Path(root).glob(f"*/{name}/{name}.so")) and not (Path(root) / name / f"{name}.so").exists():
            print(f"zoo: compiling the CPU kernels once, into {root} (a few seconds)", file=sys.stderr)
        cpp_extension.load(name, [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           is_python_module=False, verbose=False)
        _register_fakes()
    except Exception as err:  # no compiler, no ninja, a failed build: the torch paths remain
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return f"{type(err).__name__}: {reason}"
    return None


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the ninja wheel's binary is there only in an activated
    environment, so its folder is added (e.g. for `/path/to/venv/bin/zoo` run directly)."""
    try:
        import ninja
    except ImportError:
        return
    folder = getattr(ninja, "BIN_DIR", None)
    if folder and folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")


def _register_fakes() -> None:
    """Shape-only versions of the ops (they write into their output arguments and return nothing), so
    that torch.compile traces a call as one op of the graph instead of breaking the graph there."""
    for op in ("gather_gemv", "topk_gemv", "ternary_gemv", "decode_attention"):
        torch.library.register_fake(f"zoo_cpu::{op}")(lambda *args: None)


@torch.compiler.assume_constant_result  # traced as its value: a compiled graph does not re-ask
def available() -> bool:
    """True when the compiled CPU kernels are loaded (building them the first time)."""
    reason = _load()
    if reason is not None and reason != "ZOO_CPU_KERNELS=0":
        _warn_once(reason)
    return reason is None


@functools.cache
def _warn_once(reason: str) -> None:
    print(f"zoo: CPU kernels not built ({reason}); using the pure-torch paths", file=sys.stderr)


def usable(weight: torch.Tensor) -> bool:
    """Whether gather_gemv can multiply by this weight: on CPU, fp32 or bf16, and the library loads."""
    return weight.device.type == "cpu" and weight.dtype in WEIGHT_DTYPES and available()


def _launch(rows: int, work_per_row: int, out: int) -> tuple[int, torch.Tensor]:
    """(threads, y): the checks every op shares, the thread count for its work, its fp32 output [rows, out]."""
    if not available():
        raise CpuKernelsUnavailable(f"zoo's CPU kernels are not available: {_load()}")
    threads = _threads() if rows * work_per_row * out >= PARALLEL_MIN_WORK else 1
    return threads, torch.empty(rows, out, dtype=torch.float32)


@torch.compiler.assume_constant_result  # a compiled graph keeps the thread count it was traced with
def _threads() -> int:
    return torch.get_num_threads()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def gather_gemv(values: torch.Tensor, indices: torch.Tensor | None, wt: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, out] fp32 = Σ_k values[:, k] · wt[indices[:, k]] (+ bias); without indices a dense GEMV
    (values [N, in]) that reads only the rows of wt whose entry in the row of values is nonzero (a row
    holding zeros, e.g. threshold-sparse, is compacted to its nonzero entries first: y = Σ_{i: x_i≠0}
    x_i · wt[i]; a zero entry's weight row never contributes, even inf or NaN). wt [in, out] fp32 or
    bf16 (accumulated in fp32), or int8 holding ternary weights with integer values in [-128, 127]
    (accumulated exactly in integers), or uint8: ternary weights packed 4 per byte
    (`zoo.kernels.ternary.pack_ternary`, [in, R]), read as such; y is then [N, 4R], the last 4R - out
    columns (padding) zero."""
    threads, y = _launch(*values.shape, wt.shape[1] * (4 if wt.dtype == torch.uint8 else 1))
    idx = None if indices is None else indices.long().contiguous()
    torch.ops.zoo_cpu.gather_gemv(_f32(values), idx, wt.contiguous(), _f32(bias), threads, y)
    return y


def topk_gemv(x: torch.Tensor, k: int, wt: torch.Tensor, bias: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [N, out] fp32, indices [N, k]): each row of x [N, in] keeps its k entries of largest |x|
    (ties to the lower index: `zoo.blocks.sparsity.topk_mask`'s choice), then y = kept·Wᵀ (+ bias)
    by `gather_gemv` — selection and multiply in one call."""
    threads, y = _launch(x.shape[0], k, wt.shape[1])
    idx = torch.empty(x.shape[0], k, dtype=torch.long)
    torch.ops.zoo_cpu.topk_gemv(_f32(x), k, wt.contiguous(), _f32(bias), threads, y, idx)
    return y, idx


def ternary_gemv(x: torch.Tensor, k: int, w: torch.Tensor, beta: torch.Tensor, bias: torch.Tensor | None = None,
                 eps: float = 1e-5, out_features: int | None = None) -> torch.Tensor:
    """A frozen BitNet b1.58 projection after its input norm, in one call: y [N, out] fp32 from x [N, in].

    Keeps the k largest |x| of each row (k = 0: all), quantizes the row to int8 by its absmax
    (`zoo.kernels.ternary.quantize_rows`), multiplies exactly by the ternary weight w (int8 [in, out],
    the `rows` layout, or the 2-bit `packed` layout uint8 [in, ceil(out/4)] with `out_features` given:
    a quarter of the bytes read) over the kept rows only, and scales by 1/s and β (one value or one per output).
    """
    threads, y = _launch(x.shape[0], k or x.shape[1], w.shape[1] if out_features is None else out_features)
    torch.ops.zoo_cpu.ternary_gemv(_f32(x), k, w, _f32(beta.reshape(-1)), _f32(bias), eps, threads, y)
    return y


CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def attends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` can take this step: one query per head, on CPU, a cache dtype it reads, D
    contiguous, nothing that needs a gradient (the kernel has no backward), and the library loads."""
    return (q.shape[2] == 1 and q.device.type == "cpu" and k.dtype in CACHE_DTYPES and k.dtype == v.dtype
            and k.stride(-1) == 1 and v.stride(-1) == 1 and q.shape[1] % k.shape[1] == 0
            and not (q.requires_grad or k.requires_grad or v.requires_grad) and available())


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y [B, H, 1, D] fp32 = softmax(q·kᵀ / √D)·v for one query per head over every key given (a decode step:
    the newest position sees the whole cache, so there is no mask); the H query heads share the KVH key/value
    heads in groups of H / KVH (grouped-query). k and v [B, KVH, L, D] fp32, bf16 or fp16 are read in place
    in their own dtype (a slice of a preallocated cache: any strides, D contiguous); sums in fp32."""
    B, H, _, D = q.shape
    threads, y = _launch(B * H, 2 * k.shape[2], D)
    y = y.view(B, H, 1, D)
    torch.ops.zoo_cpu.decode_attention(q.float(), k, v, D ** -0.5, threads, y)
    return y


@functools.cache
def fast_matmul(dtype: torch.dtype) -> bool:
    """Whether torch's CPU matmul has a fast path for `dtype` on this CPU: bf16 with AVX-512 BF16 or AMX,
    fp16 with AMX-FP16, int8 (`torch._int_mm`) with VNNI. Without one, torch falls back to a generic loop
    that is 10-50x slower than its fp32 GEMM (2-core Zen 3, AVX2: a bf16 64x576 @ 576x3072 326 ms against
    7 ms through fp32; `_int_mm` 103 ms against 8), so batched products (prefill) go through fp32
    (`matmul`). A torch without these probes keeps its own path."""
    probes = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              torch.float16: ("_is_amx_fp16_supported",), torch.int8: ("_is_vnni_supported",)}
    if dtype not in probes:
        return True
    try:
        return any(getattr(torch.cpu, probe)() for probe in probes[dtype])
    except (AttributeError, RuntimeError):
        return True


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D); bf16/fp16 operands on a CPU without a fast half-precision GEMM (`fast_matmul`) are
    multiplied in fp32 and the product rounded back once (torch's own half GEMM also sums in fp32)."""
    if a.device.type != "cpu" or fast_matmul(a.dtype):
        return a @ b
    return (a.float() @ b.float()).to(a.dtype)
