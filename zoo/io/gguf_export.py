"""zoo checkpoints -> GGUF files that llama.cpp runs.

The model is first put in its transformers form (`zoo.io.hf.hf_view`: config.json and tensors by
transformers name, ternary projections as W̃·β), then written by the architecture's `GGUFLayout`
read the other way than on import: metadata keys from config.json, GGUF tensor names from
transformers ones, q/k rows permuted where llama.cpp's RoPE is interleaved, each layer's experts
stacked into one tensor. Ternary projections become TQ1_0 / TQ2_0 blocks: with one β per matrix
the blocks hold W̃ exactly and β goes into llama.cpp's per-tensor `.scale`; with one β per row
each block's float16 scale is its row's β. The tokenizer becomes llama.cpp's byte-level BPE
("gpt2") vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.errors import CheckpointError, ZooError, one_of
from zoo.files import atomic_open
from zoo.io.checkpoint import load
from zoo.io.gguf import LLAMA3_SPLIT, permute
from zoo.io.hf import hf_view
from zoo.runs import read_meta, resolve_checkpoint

TYPES = ("f32", "f16", "bf16", "q8_0", "tq2_0", "tq1_0")
TERNARY_TYPES = ("tq2_0", "tq1_0")
# config.json keys a layout fixes -> the recipe key a refusal names
RECIPE_KEYS = {"hidden_act": "model.ffn.activation", "tie_word_embeddings": "model.tie_embeddings",
               "norm_topk_prob": "model.ffn.router.renormalize", "mlp_only_layers": "model.layers",
               "decoder_sparse_step": "model.layers"}
# llama.cpp architectures whose output.weight is required (a tied head is written as a copy)
HEAD_REQUIRED = ("qwen2moe", "olmoe")
# llama.cpp token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def export_gguf(src: str | Path, out: str | Path, type: str = "f16", arch: str | None = None,
                drop_sparsity: bool = False, force: bool = False) -> Path:
    """Write the GGUF file of a zoo checkpoint (or run folder); nothing is left behind on failure."""
    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError:
        raise ZooError("writing GGUF files needs the 'gguf' package: pip install 'qsparse-zoo[interop]'") from None
    if type not in TYPES:
        raise CheckpointError(f"--type {type!r} is not a GGUF export type; {one_of(TYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; choose a new output file (or --force to replace it)")
    folder = resolve_checkpoint(src)
    model = load(folder)
    view = hf_view(model, arch, drop_sparsity, fmt="GGUF")
    layout = view.converter.gguf
    config = view.config
    if layout is None:
        raise CheckpointError(f"{config['model_type']}: llama.cpp has no architecture zoo writes for this layout")
    check_layout(layout, config)
    ternary = "quantization_config" in config and bool(layout.ternary)
    if type in TERNARY_TYPES and not ternary:
        raise CheckpointError(f"--type {type}: the model's projections are not ternary (model.weights.kind = "
                              f"{model.recipe.model.weights.kind!r}); tq1_0 / tq2_0 need bitnet158 weights")
    tokenizer = tokenizer_entries(folder, model.recipe, config["vocab_size"], read_meta(folder))
    tensors = gguf_tensors(layout, config, view.tensors, type)
    with atomic_open(out, "wb") as f:  # the writer fills the temporary file that atomic_open renames
        write(f.name, layout.arch, model.recipe, config, layout, tensors, tokenizer, view.dropped)
    return out


def check_layout(layout, config: dict[str, Any]) -> None:
    """Refuse, in one line naming the feature, a model that llama.cpp's architecture computes differently."""
    act = config.get("hidden_act")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"model.ffn.activation: {act!r}: llama.cpp's {layout.arch} computes SiLU(gate)·up")
    for key, value, why in layout.fixed:
        if why is not None and config.get(key, value) != value:
            raise CheckpointError(f"{RECIPE_KEYS.get(key, key)}: {why}")


def qtype(name: str, t: torch.Tensor, type: str, ternary: bool):
    """The GGML type a tensor is stored in: vectors in F32, ternary projections in the ternary
    type, embeddings and head of a ternary export in F16, other matrices in `type`."""
    from gguf import GGMLQuantizationType as Q

    if t.dim() == 1:
        return Q.F32
    if type in TERNARY_TYPES:
        if not ternary:
            return Q.F16
        if t.shape[-1] % 256:
            raise CheckpointError(f"tensor {name!r}: rows of {t.shape[-1]}; {type.upper()} blocks hold 256 weights "
                                  "(the input width must be a multiple of 256)")
        return Q[type.upper()]
    if type == "q8_0" and t.shape[-1] % 32:
        return Q.F16  # Q8_0 blocks hold 32 weights; llama.cpp's quantizer falls back the same way
    return Q[type.upper()]


def encode(t: torch.Tensor, q) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    x = t.detach().to(torch.float32).contiguous().numpy()
    if q == Q.F32:
        return x
    if q == Q.F16:
        return x.astype(np.float16)
    return quantize(x, q)


def gguf_tensors(layout, config: dict[str, Any], hf: dict[str, torch.Tensor], type: str) -> dict[str, tuple]:
    """GGUF name -> (raw data, GGML type), in writing order: q/k permuted, experts stacked, ternary
    projections split into W̃ and β."""
    from gguf import GGMLQuantizationType as Q

    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    if layout.arch in HEAD_REQUIRED and "lm_head.weight" not in hf:  # tied: the head is a copy of the embedding
        hf = {**hf, "lm_head.weight": hf["model.embed_tokens.weight"]}
    grouped: dict[str, dict[int | None, torch.Tensor]] = {}
    ternary: set[str] = set()
    for name, t in hf.items():
        gname, expert = layout.slot(name)
        t = t.float()
        if layout.permute_qk and name.split(".")[-2] in heads:
            t = permute(t, heads[name.split(".")[-2]])
        if layout.pattern(name) in layout.flat:
            t = t.reshape(-1)
        if layout.pattern(name) in layout.ternary:
            ternary.add(gname)
        grouped.setdefault(gname, {})[expert] = t
    out = {}
    for gname, parts in grouped.items():
        t = parts[None] if None in parts else torch.stack([parts[e] for e in range(len(parts))])
        q = qtype(gname, t, type, gname in ternary)
        if q in (Q.TQ1_0, Q.TQ2_0):
            beta = t.abs().amax()
            if torch.equal(t.abs(), torch.where(t != 0, beta, 0)):  # one β for the matrix: W̃ exact, β in .scale
                out[gname] = (encode(t / beta, q), q)
                out[gname[: -len("weight")] + "scale"] = (np.array([beta.item()], dtype=np.float32), Q.F32)
                continue
        out[gname] = (encode(t, q), q)
    return out


def write(path: str, arch: str, recipe, config: dict[str, Any], layout, tensors: dict[str, tuple],
          tokenizer: list[tuple[str, Any]], dropped: list[tuple[str, str]]) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(path, arch)
    w.add_name(recipe.name or "zoo-model")
    p = f"{arch}."
    for key, hf, kind, _ in layout.keys:
        value = config.get(hf)
        if value is None:
            continue
        (w.add_float32 if kind is float else w.add_uint32)(p + key, kind(value))
    w.add_uint32(p + "rope.dimension_count", config["head_dim"])
    w.add_uint32(p + "vocab_size", config["vocab_size"])
    for method, value in tokenizer:
        getattr(w, method)(value)
    w.add_string("zoo.recipe", recipe.to_toml())
    if dropped:  # the file computes the dense model; say that it was trained sparse
        w.add_array("zoo.trained_sparse", [f"{key}: {feature}" for key, feature in dropped])
    for name, (data, q) in tensors.items():
        w.add_tensor(name, data, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- tokenizer -------------------------------------------------------------------------------


def byte_unicode() -> list[str]:
    """GPT-2's printable stand-in character of each byte (the alphabet of byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tokenizer_entries(folder: Path, recipe, vocab_size: int, meta: dict[str, Any]) -> list[tuple[str, Any]]:
    """GGUFWriter calls that store the checkpoint's tokenizer as llama.cpp's "gpt2" (byte-level BPE) model:
    tokenizer.json's BPE, or zoo's byte tokenizer as the 256 byte tokens. GGUF has no empty arrays and
    llama.cpp needs merges: the byte vocabulary gets one that never applies (0xFF 0xFF, never in UTF-8
    text, merging into no token)."""
    path = folder / "tokenizer.json"
    if path.is_file():
        return bpe_entries(path, vocab_size, meta.get("source", {}).get("tokenizer", {}))
    kind = recipe.data.tokenizer.kind
    if kind != "bytes":
        raise CheckpointError(f"{folder}: data.tokenizer.kind {kind!r} but no tokenizer.json in the checkpoint; "
                              "llama.cpp needs the vocabulary")
    if vocab_size < 256:
        raise CheckpointError(f"model.vocab_size: {vocab_size} is below the byte tokenizer's 256 ids")
    tokens = byte_unicode() + [f"[PAD{i}]" for i in range(256, vocab_size)]
    never = f"{tokens[255]} {tokens[255]}"
    return [("add_tokenizer_model", "gpt2"), ("add_tokenizer_pre", "gpt-2"), ("add_token_list", tokens),
            ("add_token_types", [NORMAL] * 256 + [UNUSED] * (vocab_size - 256)), ("add_token_merges", [never]),
            ("add_add_bos_token", False)]


def pre_name(data: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name of a tokenizer.json pre_tokenizer (GPT-2's or Llama 3's), or None."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == \
            LLAMA3_SPLIT and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
        return "llama-bpe"
    return None


def bpe_entries(path: Path, vocab_size: int, recorded: dict[str, Any]) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt JSON ({err})") from None
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    if model.get("type") != "BPE" or model.get("byte_fallback") or \
            not any(d.get("type") == "ByteLevel" for d in decoders):
        kind = f"{model.get('type')} model" + (" with byte fallback" if model.get("byte_fallback") else "")
        raise CheckpointError(f"{path}: a {kind} cannot be written as llama.cpp's byte-level BPE ('gpt2') "
                              "vocabulary (only byte-level BPE can)")
    pre = recorded.get("pre") or pre_name(data)
    if pre is None:
        raise CheckpointError(f"{path}: pre_tokenizer {json.dumps(data.get('pre_tokenizer'))[:80]} has no llama.cpp "
                              "name zoo knows (GPT-2's byte-level regex or Llama 3's split)")
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    ids.update({c: t["id"] for c, t in added.items()})
    size = max(vocab_size, max(ids.values()) + 1)
    if size > vocab_size:
        raise CheckpointError(f"{path}: token id {size - 1} is outside the model's vocabulary of {vocab_size}")
    tokens, types = [f"[PAD{i}]" for i in range(size)], [UNUSED] * size
    for tok, i in ids.items():
        tokens[i] = tok
        types[i] = (CONTROL if added[tok].get("special") else USER_DEFINED) if tok in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    entries = [("add_tokenizer_model", "gpt2"), ("add_tokenizer_pre", pre), ("add_token_list", tokens),
               ("add_token_types", types), ("add_token_merges", merges)]
    bos, eos = recorded.get("bos"), recorded.get("eos")
    config = path.with_name("tokenizer_config.json")
    if config.is_file():
        cfg = json.loads(config.read_text(encoding="utf-8"))
        name = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items()
                if k in ("bos_token", "eos_token")}
        bos = ids.get(name.get("bos_token"), bos)
        eos = ids.get(name.get("eos_token"), eos)
    post = data.get("post_processor") or {}
    first = (post.get("single") or [{}])[0] if post.get("type") == "TemplateProcessing" else {}
    if "SpecialToken" in first:
        bos = ids.get(first["SpecialToken"]["id"], bos)
    entries += [(m, v) for m, v in (("add_bos_token_id", bos), ("add_eos_token_id", eos)) if v is not None]
    entries.append(("add_add_bos_token", bool(recorded.get("add_bos", "SpecialToken" in first))))
    return entries
