"""GGUF (llama.cpp) files -> zoo checkpoints, dequantized to full precision.

A GGUF file is read as if it were a Hugging Face folder: its metadata becomes a config.json
dictionary and its tensors are served under transformers' names, so the architecture's
converter (`zoo.io.arch`) applies unchanged; its `GGUFLayout` holds the architecture name and
the tables of metadata keys and tensor names. llama.cpp's converter permutes the rows of q and k so that its
interleaved RoPE (pairs 2i, 2i+1) reproduces transformers' half-split RoPE (pairs i, i + d/2);
`unpermute` undoes it. The tokenizer is rebuilt from the GGUF vocabulary with `tokenizers`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.errors import CheckpointError, ZooError, one_of
from zoo.io.arch import REQUIRED, Converter, GGUFLayout
from zoo.io.hf import SLOT, HFConfig, hf_recipe, load_weights, save_converted
from zoo.io.ternary import split_ternary
from zoo.model.build import build
from zoo.registry import get_registry


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of one projection from llama.cpp's interleaved-pair order back to the half-split order."""
    hd = w.shape[0] // heads
    return w.reshape(heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFFile:
    """Metadata and dequantized tensors of one GGUF file."""

    def __init__(self, path: Path):
        try:
            from gguf import GGUFReader
        except ModuleNotFoundError:
            raise ZooError("reading GGUF files needs the 'gguf' package: pip install 'qsparse-zoo[interop]'") from None
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        try:
            self.reader = GGUFReader(str(path))
        except (ValueError, OSError, KeyError, IndexError) as err:
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
        self.fields = {f.name: f for f in self.reader.fields.values()}
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def need(self, key: str) -> Any:
        v = self.value(key)
        if v is None:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
        return v

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32, in numpy (row-major, [out, in]) order."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {name!r} has type {GGMLQuantizationType(t.tensor_type).name}, "
                                  "which this gguf package cannot dequantize") from None
        shape = tuple(int(n) for n in reversed(t.shape))
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def layouts() -> dict[tuple[str, bool], tuple[str, GGUFLayout]]:
    """(GGUF architecture, experts) -> (model_type, layout) of the registered converters with a GGUF form.

    Several converters may declare one GGUF architecture (llama.cpp stores Mistral as `llama`, and
    Mixtral as `llama` with experts): the one registered under the architecture's own name reads it."""
    registry = get_registry()
    found: dict[tuple[str, bool], tuple[str, GGUFLayout]] = {}
    for kind in registry.kinds(SLOT):
        conv: Converter = registry.get(SLOT, kind).factory()
        key = None if conv.gguf is None else (conv.gguf.arch, conv.gguf.experts)
        if key is not None and (key not in found or kind == conv.gguf.arch):
            found[key] = (kind, conv.gguf)
    return found


def hf_config(g: GGUFFile) -> tuple[dict[str, Any], GGUFLayout]:
    """A transformers config.json dictionary equivalent to the GGUF metadata, and the layout read."""
    arch = g.need("general.architecture")
    known = layouts()
    p = f"{arch}."
    experts = bool(g.value(p + "expert_count", 0))
    if (arch, experts) not in known:
        names = sorted({a for a, _ in known})
        if arch in names:
            raise CheckpointError(f"{g.path}: {p}expert_count={g.value(p + 'expert_count', 0)}: no converter reads "
                                  f"{'mixture-of-experts' if experts else 'dense'} {arch!r} GGUF files")
        raise CheckpointError(f"{g.path}: general.architecture {arch!r} is not supported; {one_of(names)}")
    model_type, layout = known[(arch, experts)]
    scaling = g.value(p + "rope.scaling.type", "none")
    if scaling not in ("none", None) and not (scaling == "linear" and g.value(p + "rope.scaling.factor", 1.0) == 1.0):
        raise CheckpointError(f"{g.path}: {p}rope.scaling.type {scaling!r} is not supported (plain RoPE only)")
    config: dict[str, Any] = {"model_type": model_type}
    for key, hf, kind, default in layout.keys:
        value = g.need(p + key) if default is REQUIRED else g.value(p + key)
        if value is None:
            value = default(config) if callable(default) else default
        if value is not None:
            config[hf] = kind(value)
    rot = int(g.value(p + "rope.dimension_count", config["head_dim"]))
    if rot != config["head_dim"]:
        raise CheckpointError(f"{g.path}: {p}rope.dimension_count={rot} differs from the head size "
                              f"{config['head_dim']}: partial rotary embeddings are not supported")
    embed = g.tensors.get(layout.gguf_name("model.embed_tokens.weight"))
    if embed is None:
        raise CheckpointError(f"{g.path}: missing tensor {layout.gguf_name('model.embed_tokens.weight')!r}")
    config.update({
        "vocab_size": int(embed.shape[1]),
        "tie_word_embeddings": layout.gguf_name("lm_head.weight") not in g.tensors,
        "attention_bias": layout.gguf_name("model.layers.0.self_attn.o_proj.bias") in g.tensors,
        "qkv_bias": layout.gguf_name("model.layers.0.self_attn.q_proj.bias") in g.tensors,
        "hidden_act": "silu",  # llama.cpp's llama-family graphs compute SiLU(gate)·up
    })
    config.update({key: value for key, value, _ in layout.fixed})
    return config, layout


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of one projection from the half-split order to llama.cpp's interleaved pairs (inverse of `unpermute`)."""
    hd = w.shape[0] // heads
    return w.reshape(heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def source(g: GGUFFile, config: dict[str, Any], layout: GGUFLayout):
    """get(transformers name) -> float32 tensor, with llama.cpp's q/k row permutation undone, one expert
    sliced out of its stacked tensor, and ternary projections served as W̃ plus "<name>_scale" β per row."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    stacked: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        gname, expert = layout.slot(name)
        if expert is None:
            t = g.tensor(gname)
        else:
            if gname not in stacked:
                stacked.clear()  # one layer's role at a time: the rules read experts in order
                stacked[gname] = g.tensor(gname)
            t = stacked[gname][expert]
        scale = g.tensors.get(gname[: -len("weight")] + "scale")
        if scale is not None:  # llama.cpp's optional per-tensor scale of a ternary projection
            t = t * g.tensor(scale.name).reshape(())
        proj = name.split(".")[-2]
        if layout.permute_qk and proj in heads:
            t = unpermute(t, heads[proj])
        return t.unsqueeze(0) if layout.pattern(name) in layout.flat else t

    def get(name: str) -> torch.Tensor:
        base = name[: -len("_scale")] if name.endswith("_scale") else name
        if layout.pattern(base) not in layout.ternary:
            return tensor(name)
        try:
            t, beta = split_ternary(tensor(base), layout.gguf_name(base))
        except CheckpointError as err:
            raise CheckpointError(f"{g.path}: {err}") from None
        return beta if name != base else t

    return get


def from_gguf(path: str | Path, dtype: str | None = None, max_seq_len: int | None = None):
    """(model, recipe) from a llama-family GGUF file, its weights dequantized."""
    return load_gguf(GGUFFile(Path(path)), dtype, max_seq_len)


def load_gguf(g: GGUFFile, dtype: str | None, max_seq_len: int | None):
    path = g.path
    config, layout = hf_config(g)
    cfg = HFConfig(config, str(path))
    recipe = hf_recipe(cfg, dtype or "float32", max_seq_len, name=path.stem)
    model = build(recipe)
    load_weights(model, cfg, source(g, config, layout), str(path))
    return model, recipe


# -- tokenizer -------------------------------------------------------------------------------

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(g: GGUFFile):
    """A `tokenizers.Tokenizer` from the GGUF vocabulary, or None (with a warning) if unsupported."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = g.value("tokenizer.ggml.model")
    tokens = g.value("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        warnings.warn(f"{g.path}: no tokenizer in the file; the checkpoint has none", stacklevel=3)
        return None
    vocab = {tok: i for i, tok in enumerate(tokens)}
    types = g.value("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in g.value("tokenizer.ggml.merges") or []]
        merges = [m for m in merges if len(m) == 2 and m[0] + m[1] in vocab]  # others never apply (llama.cpp
        # keeps the parts); `tokenizers` would panic on them
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        pre = g.value("tokenizer.ggml.pre", "default")
        if pre in ("llama-bpe", "llama3", "qwen2"):
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre == "smollm":  # every digit on its own, then GPT-2's split (llama.cpp's and transformers' SmolLM)
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False)])
        else:
            if pre not in ("default", "gpt2", "gpt-2"):
                warnings.warn(f"{g.path}: tokenizer.ggml.pre {pre!r} is approximated by GPT-2's pre-tokenizer",
                              stacklevel=3)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = g.value("tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), fuse_unk=True,
                                   byte_fallback=True, unk_token=tokens[int(g.value("tokenizer.ggml.unknown_token_id",
                                                                                      0))]))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        warnings.warn(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported (gpt2, llama); "
                      "the checkpoint has no tokenizer", stacklevel=3)
        return None
    special = [tokens[i] for i, t in enumerate(types) if t == 3]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    bos = g.value("tokenizer.ggml.bos_token_id")
    if bos is not None and g.value("tokenizer.ggml.add_bos_token", kind == "llama"):
        b = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                           special_tokens=[(b, int(bos))])
    return tok


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece vocabulary: a merge ranks by its result's score."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    found = []
    for tok, score, kind in zip(tokens, scores, types):
        if kind != 1 or len(tok) < 2:
            continue
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def convert_gguf(src: str | Path, out: str | Path, dtype: str | None = None, max_seq_len: int | None = None) -> Path:
    """Write the zoo checkpoint of a GGUF file (recipe, dequantized weights, tokenizer.json)."""
    g = GGUFFile(Path(src))
    model, _ = load_gguf(g, dtype, max_seq_len)
    tok = gguf_tokenizer(g)
    files = {} if tok is None else {"tokenizer.json": tok.to_str()}
    source = {"format": "gguf", "path": str(g.path)}
    if tok is not None:  # what tokenizer.json cannot hold, for `zoo export gguf`
        source["tokenizer"] = {k: v for k, v in (("pre", g.value("tokenizer.ggml.pre")),
                                                 ("bos", g.value("tokenizer.ggml.bos_token_id")),
                                                 ("eos", g.value("tokenizer.ggml.eos_token_id")),
                                                 ("add_bos", g.value("tokenizer.ggml.add_bos_token"))) if v is not None}
    return save_converted(model, out, files, source)
