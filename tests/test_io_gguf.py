"""GGUF import: tiny llama files written with gguf's own writer in several quantization types."""

import numpy as np
import pytest
import torch

import zoo
from tests.hf_util import assert_same_function, randomize, transformers

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

HEADS, KV, D, FF, VOCAB = 4, 2, 64, 256, 300


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: rows of each head from half-split to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random raw K-quant blocks with finite scales (gguf can dequantize these types, not quantize)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = rng.uniform(0.002, 0.02, size=(rows, cols // block)).astype(np.float16).view(np.uint8)
    scale = scale.reshape(rows, cols // block, 2)
    if qtype == Q.Q4_K:  # d, dmin at the start
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    else:  # Q6_K: d at the end
        raw[..., size - 2:] = scale
    return raw.reshape(rows, -1)


# Per tensor kind: the stored type (K-quants need rows of 256: only ffn_down has them here).
TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16, "ffn_gate": Q.Q8_0,
         "ffn_up": Q.Q4_0, "attn_norm": Q.F32, "ffn_norm": Q.F32}


def write_gguf(path, hf_model, tokenizer=None, tie=False, down=(Q.Q4_K, Q.Q6_K), extra=None, arch="llama"):
    """Write `hf_model` as llama.cpp would; returns {hf name: the dequantized reference in HF layout}.

    llama: q/k rows permuted for the interleaved RoPE; qwen2: not permuted, q/k/v biases in F32."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_block_count(2)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D // HEADS)
    for key, value in (extra or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    if tokenizer is not None:
        tokenizer(w)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    ref = {}

    def put(gname, hname, qtype, heads=None):
        x = sd[hname]
        stored_layout = llama_permute(x, heads) if heads else x
        if qtype in (Q.Q4_K, Q.Q6_K):
            data = random_kquant(*x.shape, qtype, rng)
        elif qtype == Q.F32:
            data = stored_layout
        elif qtype == Q.F16:
            data = stored_layout.astype(np.float16)
        else:
            data = gguf.quants.quantize(stored_layout, qtype)
        w.add_tensor(gname, data, raw_dtype=qtype)
        back = gguf.quants.dequantize(data, qtype).reshape(x.shape)
        if heads:  # invert the permutation by index, independently of zoo's code
            order = llama_permute(np.arange(x.shape[0]), heads)
            back = back[np.argsort(order)]
        ref[hname] = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))

    put("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0)
    put("output_norm.weight", "model.norm.weight", Q.F32)
    if not tie:
        put("output.weight", "lm_head.weight", Q.F16)
    for i in range(2):
        for g, h, heads in (("attn_q", "self_attn.q_proj", HEADS), ("attn_k", "self_attn.k_proj", KV),
                            ("attn_v", "self_attn.v_proj", None), ("attn_output", "self_attn.o_proj", None),
                            ("ffn_gate", "mlp.gate_proj", None), ("ffn_up", "mlp.up_proj", None),
                            ("ffn_down", "mlp.down_proj", None), ("attn_norm", "input_layernorm", None),
                            ("ffn_norm", "post_attention_layernorm", None)):
            qtype = down[i] if g == "ffn_down" else TYPES[g]
            put(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight", qtype, heads if arch == "llama" else None)
            if arch == "qwen2" and g in ("attn_q", "attn_k", "attn_v"):
                put(f"blk.{i}.{g}.bias", f"model.layers.{i}.{h}.bias", Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def tiny_llama(tie=False):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
                                   rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    randomize(model, seed=1)
    return model


@pytest.mark.parametrize("tie, down", [(False, (Q.Q4_K, Q.Q6_K)), (True, (Q.F16, Q.Q8_0))])
def test_gguf_matches_the_dequantized_reference(tmp_path, tie, down):
    hf = tiny_llama(tie)
    ref = write_gguf(tmp_path / "m.gguf", hf, tie=tie, down=down)
    hf.load_state_dict({**hf.state_dict(), **ref}, strict=True)
    if tie:
        hf.tie_weights()
    model, recipe = zoo.from_gguf(tmp_path / "m.gguf")
    assert recipe.model.tie_embeddings == tie and recipe.model.position.config.theta == 5000.0
    assert_same_function(model, hf, VOCAB)


def test_qwen2_gguf_with_biases(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
                                   rope_theta=5000.0, rms_norm_eps=1e-5)
    hf = transformers.Qwen2ForCausalLM(cfg).float().eval()
    randomize(hf, seed=2)
    ref = write_gguf(tmp_path / "q.gguf", hf, down=(Q.Q6_K, Q.Q4_K), arch="qwen2")
    hf.load_state_dict({**hf.state_dict(), **ref}, strict=True)
    model, recipe = zoo.from_gguf(tmp_path / "q.gguf")
    assert recipe.model.attention.config.qkv_bias
    assert_same_function(model, hf, VOCAB)


def _gpt2_tokenizer(text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=
                                                        pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def test_convert_cli_builds_the_gpt2_tokenizer(tmp_path):
    import json

    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void. " * 20
    src = _gpt2_tokenizer(text)
    data = json.loads(src.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    tokens = sorted(vocab, key=vocab.get)
    tokens += [f"<pad{i}>" for i in range(VOCAB - len(tokens))]

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
        w.add_token_types([1] * len(tokens))

    write_gguf(tmp_path / "m.gguf", tiny_llama(), tokenizer=add, down=(Q.Q8_0, Q.Q8_0))
    from zoo.cli import main

    assert main(["convert", "gguf", str(tmp_path / "m.gguf"), str(tmp_path / "zoo")]) == 0
    from tokenizers import Tokenizer

    got = Tokenizer.from_file(str(tmp_path / "zoo" / "tokenizer.json"))
    sample = "And God said, Let there be light: and there was light."
    assert got.encode(sample).ids == src.encode(sample).ids
    assert got.decode(got.encode(sample).ids) == sample
    model = zoo.load(tmp_path / "zoo")
    assert model.config.vocab_size == VOCAB
    spec = model.recipe.data.tokenizer
    tok = zoo.get_registry().get("tokenizer", spec.kind).factory(spec.config)
    assert torch.as_tensor(tok.encode(sample)).tolist() == src.encode(sample).ids  # what zoo train would use


def test_sentencepiece_vocabulary_becomes_a_byte_fallback_bpe(tmp_path):
    from zoo.io.gguf import GGUFFile, gguf_tokenizer

    pieces = ["▁", "t", "h", "e", "a", "th", "▁a", "▁th", "▁the"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)

    def add(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)

    write_gguf(tmp_path / "m.gguf", tiny_llama(), tokenizer=add, down=(Q.F16, Q.F16))
    tok = gguf_tokenizer(GGUFFile(tmp_path / "m.gguf"))
    ids = tok.encode("the a é").ids
    index = {t: i for i, t in enumerate(tokens)}
    assert ids == [1, index["▁the"], index["▁a"], index["▁"], index["<0xC3>"], index["<0xA9>"]]
    assert tok.decode(ids) == "the a é"


def test_bad_gguf_files_are_clear_errors(tmp_path):
    with pytest.raises(zoo.CheckpointError, match="no such GGUF file"):
        zoo.from_gguf(tmp_path / "none.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(zoo.CheckpointError, match="not a readable GGUF file"):
        zoo.from_gguf(tmp_path / "junk.gguf")
    write_gguf(tmp_path / "moe.gguf", tiny_llama(), down=(Q.F16, Q.F16), extra={"llama.expert_count": 8})
    with pytest.raises(zoo.CheckpointError, match="metadata key 'llama.expert_used_count' is missing"):
        zoo.from_gguf(tmp_path / "moe.gguf")
    write_gguf(tmp_path / "moe2.gguf", tiny_llama(), down=(Q.F16, Q.F16), arch="bitnet",
               extra={"bitnet.expert_count": 8})
    with pytest.raises(zoo.CheckpointError, match="expert_count=8: no converter reads mixture-of-experts 'bitnet'"):
        zoo.from_gguf(tmp_path / "moe2.gguf")
    write_gguf(tmp_path / "yarn.gguf", tiny_llama(), down=(Q.F16, Q.F16), extra={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(zoo.CheckpointError, match="rope.scaling.type 'yarn' is not supported"):
        zoo.from_gguf(tmp_path / "yarn.gguf")
    data = (tmp_path / "moe.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(zoo.CheckpointError, match="cut.gguf"):
        zoo.from_gguf(tmp_path / "cut.gguf")
