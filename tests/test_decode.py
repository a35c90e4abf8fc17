"""The decode engine (zoo.model.decode): its logits over 20 decode steps are the eager model's, for
every weights × sparsity × FFN combination, in fp32, bf16 and fp16."""

import copy
import dataclasses
import types

import pytest
import torch

import zoo
from tests.conftest import RECIPES, needs_cxx
from zoo.contracts import Weights
from zoo.eval.calibrate import calibrate
from zoo.kernels import prepare_inference
from zoo.model.decode import Decoder, run_lengths

SHAPE = ["model.n_layers=2", "model.d_model=48", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=61",
         "model.max_seq_len=40"]
TOPK = ["model.sparsity.kind='topk'", "model.sparsity.keep=0.5"]
THRESHOLD = ["model.sparsity.kind='threshold'", "model.sparsity.keep=0.5"]  # calibrated by `build`
BITNET = ["model.weights.kind='bitnet158'"]
MOE = ["model.ffn={kind='moe'}", "model.ffn.num_experts=4", "model.ffn.top_k=2",
       "model.ffn.expert={kind='glu', hidden=32, activation='relu2'}"]
COMBOS = {  # name: (overrides, freeze)
    "dense": ([], False),
    "qsparse": (TOPK, False),
    # blocks of 4: more blocks per row than kth_largest's few-rows cut-off (the NumPy path eagerly)
    "block-qsparse": (["model.sparsity.kind='block_topk'", "model.sparsity.n=2", "model.sparsity.m=4"], False),
    "relu2": (["model.ffn.activation='relu2'"], False),
    "bitnet": (BITNET, True),
    "bitnet-qsparse": (BITNET + TOPK, True),
    "threshold": (THRESHOLD, False),
    "bitnet-threshold": (BITNET + THRESHOLD, True),
    "moe": (MOE, False),
    "moe-bitnet-qsparse": (MOE + BITNET + TOPK, True),
}
PROMPT, STEPS = 7, 20


def build(name: str, dtype: torch.dtype) -> torch.nn.Module:
    overrides, freeze = COMBOS[name]
    torch.manual_seed(0)
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/dense.toml", SHAPE + ["model.ffn.hidden=64"] * (name[:3] != "moe")
                                      + overrides)).to(dtype).eval()
    if THRESHOLD[0] in overrides:  # thresholds that zero about half of each projection's input
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
        calibrate(model, [(ids, ids)])
    return model.freeze() if freeze else model


def eager_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[STEPS + 1, V]: the eager model's logits after the prompt, then after each fed token."""
    with torch.no_grad():
        cache = model.new_cache(1)
        out = [model(ids[:, :PROMPT], cache=cache).logits[:, -1]]
        out += [model(ids[:, t:t + 1], cache=cache, start=t).logits[:, -1] for t in range(PROMPT, PROMPT + STEPS)]
    return torch.cat(out).float()


def engine_logits(decoder: Decoder, ids: torch.Tensor) -> torch.Tensor:
    out = [decoder.prefill(ids[:, :PROMPT])]
    out += [decoder.step(ids[:, t:t + 1]) for t in range(PROMPT, PROMPT + STEPS)]
    return torch.cat(out).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


# fp16: the dense and Q-Sparse models (no zoo kernel takes fp16 weights: torch's ops, as in the eager model)
CASES = [(n, d) for n in COMBOS for d in (torch.float32, torch.bfloat16)]
CASES += [(n, torch.float16) for n in ("dense", "qsparse")]
IDS = [f"{n}-{str(d)[6:]}" for n, d in CASES]


def check(name: str, dtype: torch.dtype, compiled: bool) -> Decoder:
    """Run the engine on model `name` in `dtype` and compare its logits with the eager model's.

    Half precision: the argmax must match the eager model's at every step and the logits be within 1e-2
    (relative) — or, where a discrete choice flipped on a rounding difference (a top-K selection: the
    compiled step rounds a fused norm once where the eager ops round after each), as close to the fp32
    model's logits as the eager half-precision model is (its relative error × 1.1, + 0.01). Frozen
    BitNet in half precision is held to the second rule only: the eager model rounds W̃·β and the
    dequantized activations to bf16/fp16 before its matmul, while the inference form multiplies the int8
    activations by the ternary weight exactly and scales in fp32, so the two differ by more than rounding
    (argmax included), and both from the fp32 model."""
    model = build(name, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    want = eager_logits(model, ids)
    decoder = Decoder(prepare_inference(copy.deepcopy(model)), max_len=PROMPT + STEPS, compile=compiled)
    got = engine_logits(decoder, ids)
    if dtype == torch.float32:
        assert rel(got, want) <= 1e-5, rel(got, want)
        return decoder
    frozen = COMBOS[name][1]
    if not frozen:
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    if frozen or rel(got, want) > 1e-2:
        exact = eager_logits(build(name, torch.float32), ids)
        assert rel(got, exact) <= 1.1 * rel(want, exact) + 0.01, (rel(got, want), rel(got, exact), rel(want, exact))
    return decoder


@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
def test_engine_decode_equals_eager(name, dtype):
    """The engine's own parts (inference forms, static cache, batched prefill, last-position head), eager layers."""
    check(name, dtype, compiled=False)


# compiling costs seconds per model kind: the dense and BitNet-threshold fp32 models here, the rest under `slow`
FAST = {("dense", torch.float32), ("bitnet-threshold", torch.float32)}  # the latter: the fused zero-skipping path
SLOW = [pytest.param(n, d, marks=[] if (n, d) in FAST else pytest.mark.slow) for n, d in CASES]


@needs_cxx
@pytest.mark.parametrize("name,dtype", SLOW, ids=IDS)
def test_compiled_decode_equals_eager(name, dtype, capfd):
    """Every combination gives the eager logits, its layer compiled as one graph: MoE layers (their decode
    rows through `MoE.pair_dispatch`), Block Q-Sparse and top-K selections outside a fused kernel (fp16,
    BitNet in bf16) included (static-shape index selection when compiling, `mask_indices`)."""
    decoder = check(name, dtype, compiled=True)
    assert decoder.compiled
    assert "layers run eagerly" not in capfd.readouterr().err
    # every step after the first called the compiled graphs directly, without torch.compile's guards
    assert decoder.direct and all(decoder.direct)


def test_run_lengths():
    """Consecutive layers of one kind go into as few compiled calls as `most` allows, with few distinct lengths."""
    assert run_lengths(2, 10) == [2]
    assert run_lengths(30, 10) == [10, 10, 10]
    assert run_lengths(30, 8) == [6] * 5
    assert run_lengths(24, 10) == [8, 8, 8]
    assert run_lengths(13, 10) == [10, 3]
    assert run_lengths(7, 3) == [3, 3, 1]
    assert sum(run_lengths(97, 10)) == 97


@needs_cxx
def test_compiled_runs_of_layers_equal_eager():
    """A model whose layers are of two kinds (layer 0 a plain MLP) runs as one call for layer 0 and calls of
    two layers for the rest (`layers_per_call=2`); the logits are the eager model's."""
    torch.manual_seed(0)
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/dense.toml", SHAPE + [
        "model.n_layers=5", "model.ffn.hidden=64", "model.layers=[{range='0', ffn={kind='mlp', hidden=40}}]"])).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    decoder = Decoder(prepare_inference(copy.deepcopy(model)), max_len=PROMPT + STEPS, compile=True, layers_per_call=2)
    assert [len(blocks) for blocks, _, _ in decoder.calls] == [1, 2, 2]
    assert decoder.calls[1][2] is decoder.calls[2][2] and decoder.calls[0][2] is not decoder.calls[1][2]
    assert rel(engine_logits(decoder, ids), eager_logits(model, ids)) <= 1e-5
    assert decoder.compiled


class CountingWeights(Weights):
    """A plugin's weights kind with no inference form, whose forward the compiler cannot capture whole:
    it counts its calls in a Python attribute through a function torch.compile must not trace."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / in_features ** 0.5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count(self)
        return torch.nn.functional.linear(x, self.weight)


@torch.compiler.disable
def count(block: CountingWeights) -> None:
    block.calls += 1


@dataclasses.dataclass(frozen=True)
class CountingConfig:
    """plain weights whose forward runs partly outside the compiled graph"""


def weights_plugin(kind: str, cls: type) -> types.ModuleType:
    """A plugin module registering the weights kind `kind`, built as `cls`."""

    @zoo.hookimpl
    def zoo_register(registry) -> None:
        registry.register("weights", kind, CountingConfig, lambda cfg, ctx, i, o, b: cls(i, o, b))

    module = types.ModuleType(f"{kind}_plugin")
    module.zoo_register = zoo_register
    return module


def plugin_model(kind: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny model with weights of the plugin kind `kind`, and prompt + step ids for it."""
    torch.manual_seed(0)
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/dense.toml", SHAPE + ["model.ffn.hidden=64",
                                                                          f"model.weights.kind='{kind}'"])).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    return model, ids


@needs_cxx
def test_plugin_block_without_inference_form_falls_back(plugin_registry, capfd):
    """A plugin weights kind with no inference form and code the compiler cannot capture: one notice for the
    missing form, one for its layers falling back to eager, and the eager logits."""
    plugin_registry(("counting", weights_plugin("counting", CountingWeights)))
    model, ids = plugin_model("counting")
    want = eager_logits(model, ids)
    engine = prepare_inference(copy.deepcopy(model))
    blocks = [m for m in engine.modules() if isinstance(m, CountingWeights)]
    for m in blocks:
        m.calls = 0
    decoder = Decoder(engine, max_len=PROMPT + STEPS, compile=True)
    assert capfd.readouterr().err.count("CountingWeights declare no inference form") == 1
    got = engine_logits(decoder, ids)
    assert rel(got, want) <= 1e-5, rel(got, want)
    assert capfd.readouterr().err.count("layers run eagerly") == 1 and not decoder.compiled
    assert {m.calls for m in blocks} == {1 + STEPS}  # its forward ran at the prefill and at every step


class RecordingWeights(CountingWeights):
    """A plugin's weights kind whose traceable forward keeps its last input in a Python attribute: an effect
    outside the graph, which torch.compile replays after it at every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_input = x
        return torch.nn.functional.linear(x, self.weight)


@needs_cxx
def test_layers_with_python_effects_keep_them(plugin_registry):
    """A layer whose forward sets a Python attribute compiles as one graph but is never called directly (the
    attribute would stop changing): every step sets it anew, and the logits are the eager model's."""
    plugin_registry(("recording", weights_plugin("recording", RecordingWeights)))
    model, ids = plugin_model("recording")
    want = eager_logits(model, ids)
    decoder = Decoder(prepare_inference(copy.deepcopy(model)), max_len=PROMPT + STEPS, compile=True)
    blocks = [m for m in decoder.model.modules() if isinstance(m, RecordingWeights)]
    got, seen = [decoder.prefill(ids[:, :PROMPT])], []
    for t in range(PROMPT, PROMPT + STEPS):
        got.append(decoder.step(ids[:, t:t + 1]))
        seen.append([m.last_input for m in blocks])
    assert rel(torch.cat(got).float(), want) <= 1e-5
    assert decoder.compiled and decoder.direct == [None]
    for before, after in zip(seen, seen[1:]):
        assert all(a is not b for a, b in zip(before, after))


@pytest.mark.slow  # nine models built and timed, two 512 MB bandwidth reads
def test_bench_decode_on_a_checkpoint(tmp_path, cli):
    """`zoo bench decode --model CKPT`: every zoo variant in fp32 and bf16 and transformers, timed, with floors
    and the ratio rows; the dense fp32 floor counts the model's bytes as transformers' does (a tied head once)."""
    import json

    torch.manual_seed(0)
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/dense.toml", SHAPE + ["model.ffn.hidden=64"]))
    zoo.save(model, tmp_path / "ckpt")
    res = cli("bench", "decode", "--model", tmp_path / "ckpt", "--only", "zoo", "transformers", "--tokens", "2",
              "--rounds", "1", "--prompt", "4", "--prefill", "8", "--eager", "--json")
    assert res.code == 0, res.err
    rows = {r["runtime"]: r for r in json.loads(res.out)["results"]}
    zoo_rows = [f"zoo {v} {d}" for v in ("dense", "qsparse 0.5", "bitnet b1.58", "bitnet + qsparse 0.5")
                for d in ("fp32", "bf16")]
    assert set(zoo_rows + ["transformers"]) <= set(rows)
    for name in zoo_rows + ["transformers"]:
        assert rows[name]["ms_per_token"] > 0 and rows[name]["prefill_tokens_per_s"] > 0
    floors = {name: rows[name]["floor_ms"] for name in ("zoo dense fp32", "transformers")}
    assert floors["zoo dense fp32"] == floors["transformers"] > 0, floors
    assert rows["zoo qsparse 0.5 fp32 / zoo dense fp32"]["weights"] == "ratio"


@needs_cxx
@pytest.mark.parametrize("wrapper", ["cpp", "python"])
def test_both_wrappers_call_the_graphs_directly(wrapper, monkeypatch):
    """Inductor's C++ wrapper (the default: no Python between the kernels) and its Python wrapper give the
    eager logits, every step after the first a direct call."""
    monkeypatch.setenv("ZOO_DECODE_WRAPPER", wrapper)
    decoder = check("bitnet-qsparse", torch.float32, compiled=True)
    assert decoder.direct and all(decoder.direct)
    assert {step.wrapper for *_, step in decoder.calls} == {wrapper}


def test_an_unknown_wrapper_is_refused(monkeypatch):
    monkeypatch.setenv("ZOO_DECODE_WRAPPER", "fortran")
    with pytest.raises(zoo.errors.ZooError, match="ZOO_DECODE_WRAPPER must be 'cpp' or 'python'"):
        Decoder(prepare_inference(build("dense", torch.float32)), max_len=30, compile=True)
