"""Every Triton kernel compiled ahead of time for the real cards, without a GPU (zoo/kernels/aot.py): each launch the
dispatcher makes at the paper's 7B and the public MoE recipes' shapes, decode and prefill, at every autotune config it
may run at, gives a cubin within the card's shared memory, spills nothing and has a grid CUDA can launch.

The compiles run in a subprocess (`zoo bench gpu --compile-only --json`): this test process interprets Triton
(TRITON_INTERPRET=1, set by conftest), and an interpreted kernel cannot be compiled.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from zoo.kernels import aot

MISSING = aot.missing_tools()
needs_tools = pytest.mark.skipif(MISSING is not None, reason=f"cannot compile for CUDA here: {MISSING}")

# The default run: every kernel at every config on both cards, at decode, one dtype per kernel family (bf16, int8),
# the up projections (the MoE's gathers its token rows; its backward runs the un-gathered grouped-mm): 60 compiles,
# ~50 s of one core. The full matrix (every dtype, shape, decode and prefill: ~270 compiles) is the `slow` test.
FAST = ["--dtypes", "bf16", "int8", "--batches", "decode", "--shapes", "7b-up", "mixtral-up"]
KERNELS = {"topk-matmul", "ternary", "ternary+gather", "grouped-mm", "grouped-mm+gather", "grouped-dw",
           "grouped-dw+gather"}


def compile_table(tmp_path, *args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "zoo", "bench", "gpu", "--compile-only", "--json", "--every-launch",
                           *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stderr
    table = json.loads(proc.stdout)
    table["returncode"] = proc.returncode
    return table


def check_table(table: dict, kernels: set[str], dtypes: set[str], batches: set[str]) -> None:
    rows = table["results"]
    broken = [f"{r['kernel']} {r['config']} {r['dtype']} {r['card']} {r['shape']} {r['batch']}: "
              + "; ".join(r["issues"]) for r in rows if r["issues"]]
    assert not broken, "kernels that would not launch (or spill) on their card:\n" + "\n".join(broken)
    assert table["returncode"] == 0
    assert {r["card"] for r in rows} == {card.name for card in aot.CARDS.values()}
    assert {r["kernel"] for r in rows} == kernels
    assert {r["batch"] for r in rows} == batches
    assert {r["dtype"].split("/")[0] for r in rows} == dtypes
    for r in rows:
        assert r["registers"] > 0 and r["shared"] >= 0 and all(n >= 1 for n in r["grid"])


def configs_per_kernel(rows: list[dict]) -> dict[str, set[str]]:
    """Kernel function -> the configs compiled for it (over every dtype, card and shape)."""
    seen: dict[str, set[str]] = {}
    for r in rows:
        seen.setdefault(r["kernel"].split("+")[0], set()).add(r["config"])
    return seen


def tuned_configs() -> dict[str, set[str]]:
    """Kernel function -> every autotune config it lists (zoo.kernels.dispatch.Tuned)."""
    import zoo.kernels.triton_moe as moe
    import zoo.kernels.triton_ternary as ternary
    import zoo.kernels.triton_topk as topk

    tuned = {"topk-matmul": topk._launch, "ternary": ternary._launch, "grouped-mm": moe._mm, "grouped-dw": moe._dw}
    return {name: {aot.config_name(c) for c in t.configs} for name, t in tuned.items()}


@needs_tools
def test_every_kernel_compiles_within_the_limits_of_both_cards(tmp_path):
    table = compile_table(tmp_path, *FAST)
    check_table(table, KERNELS - {"grouped-dw"}, {"bf16", "int8"}, {"decode"})
    # at one dtype each kernel compiles every config its `fits` keeps for it: all but the MoE's fp32-only ones
    compiled, listed = configs_per_kernel(table["results"]), tuned_configs()
    assert compiled == {**listed, "grouped-mm": compiled["grouped-mm"], "grouped-dw": compiled["grouped-dw"]}
    assert len(compiled["grouped-mm"]) == 5 and len(compiled["grouped-dw"]) == 4


@needs_tools
@pytest.mark.slow
def test_the_full_matrix_compiles_within_the_limits_of_both_cards(tmp_path):
    """Every dtype (fp32 with and without TF32, fp16, bf16, int8), decode and prefill: ~6 min of one core."""
    table = compile_table(tmp_path)
    check_table(table, KERNELS, {"fp32", "fp16", "bf16", "int8"}, {"decode", "prefill"})
    assert {r["dtype"] for r in table["results"] if r["kernel"].startswith("grouped")} == {
        "fp32", "fp32/tf32", "fp16", "bf16"}
    assert configs_per_kernel(table["results"]) == tuned_configs()  # no config is dead: each one launches somewhere


def test_limit_issues_names_each_broken_limit():
    card = aot.CARDS["sm_80"]
    good = aot.Footprint("k", {}, "", {}, card.name, registers=64, shared=card.shared_limit, spills=0, threads=1024,
                         grid=(2**31 - 1, 65535, 65535), cubin=1000)
    assert aot.limit_issues(good, card) == []
    bad = aot.Footprint("k", {}, "", {}, card.name, registers=255, shared=card.shared_limit + 1, spills=8,
                        threads=2048, grid=(2**31, 65536, 0), cubin=0)
    issues = aot.limit_issues(bad, card)
    for part in ("no cubin", "shared 166913 B > 166912 B", "spills 8 B", "2048 threads", "grid.x", "grid.y", "grid.z"):
        assert any(part in i for i in issues), (part, issues)


def test_compile_only_says_in_one_line_what_is_missing(monkeypatch, capsys):
    from zoo.cli import main

    monkeypatch.setattr(aot, "missing_tools", lambda: "cuobjdump not found (triton looks in X)")
    assert main(["bench", "gpu", "--compile-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cuobjdump not found" in err


@needs_tools
def test_compile_only_refuses_an_interpreting_triton(monkeypatch, capsys):
    from zoo.cli import main
    from zoo.kernels import dispatch

    monkeypatch.setattr(dispatch, "interpreting", lambda: True)
    assert main(["bench", "gpu", "--compile-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TRITON_INTERPRET" in err


TENSOR_CORE_FP32 = {"BLOCK_N=128 BLOCK_K=64 w4 s3", "BLOCK_N=64 BLOCK_K=64 w4 s4", "BLOCK_N=128 BLOCK_K=32 w4 s4"}


@pytest.mark.parametrize("dtype,tf32,expected", [
    ("float32", False, {"BLOCK_N=64 BLOCK_K=32 w8 s3", "BLOCK_N=32 BLOCK_K=32 w4 s3", "BLOCK_N=64 BLOCK_K=16 w4 s3"}),
    ("float32", True, TENSOR_CORE_FP32),  # 256x64 and 128x128 at 3 stages need 240 / 288 KB on sm_90: not tried
    ("bfloat16", False, TENSOR_CORE_FP32 | {"BLOCK_N=256 BLOCK_K=64 w8 s3", "BLOCK_N=128 BLOCK_K=128 w8 s3"})])
def test_the_autotuner_prunes_with_the_same_choice(monkeypatch, dtype, tf32, expected):
    """On CUDA `Tuned` hands `configs_for` to triton.autotune as its early_config_prune: triton's own pruning keeps
    the configs the ahead-of-time compile checks (fp32 without TF32: the FMA configs; else the shared-memory fit)."""
    import torch

    import zoo.kernels.triton_moe as moe
    from zoo.kernels import dispatch

    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(moe, "BLOCK_M", 64)  # the CUDA value (this process interprets: 16)
    tuned = dispatch.Tuned(moe._grouped_mm_kernel, moe._mm.configs, ["N_IN", "N_OUT", "PRECISION"], moe._FIXED,
                           moe._mm.fits)
    named = {"x_ptr": torch.empty(64, 4096, device="meta", dtype=getattr(torch, dtype))}
    constexprs = {"GATHER": True, "PRECISION": "tf32" if tf32 else "ieee", "BLOCK_M": 64}
    tuned._autotuned.nargs = named
    pruned = tuned._autotuned.prune_configs(constexprs)
    assert pruned == tuned.configs_for(named, constexprs)
    assert {aot.config_name(c) for c in pruned} == expected
