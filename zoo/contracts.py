"""What zoo's core may call on a block, slot by slot: read this first to write a plugin.

A factory registered for a slot (`registry.register(slot, kind, config, factory)`) returns a
block that satisfies the slot's contract below; `ctx.build` checks it when the model is built
and refuses one that does not with one line naming the plugin, the slot, the kind and the
missing member. The core calls only the members declared here: nothing else is looked for.

Two kinds of contract:

- a **base class** (`Weights`, `InferenceForm`, `Sparsity`, `FFN`, `KernelBackend`, `Corpus`,
  `Tokenizer`): the block subclasses it and overrides what it needs; every other member keeps
  the documented default. The core calls the members; it never asks whether they exist.
- a **call** (`Norm`, `Position`, `Attention`, `Activation`, `Router`): any `torch.nn.Module`
  whose `forward` has that signature.

A weights block owns its **inference form**: `zoo.kernels.prepare_inference(model)` asks every
projection's block for `inference_form(sparsify, device, dtype, impl)` and puts the returned
`InferenceForm` (frozen or packed storage, its own decode kernel, possibly fused with the input
sparsity) in its place. docs/plugins.md walks through writing one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from zoo.errors import PluginError


def _held_nbytes(module: nn.Module) -> int:
    """Bytes of the module's own parameters and buffers (not its submodules'), as held."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(recurse=False),
                                                     *module.buffers(recurse=False)))


# ---------------------------------------------------------------------------------------------
# weights: factory(cfg, ctx, in_features, out_features, bias) -> Weights


class Weights(nn.Module):
    """A projection's weights: `forward(x) -> x·Wᵀ (+ b)` (or `forward(x, sparsify)`, see
    `sparsify_inside`). Subclass it (with `nn.Linear` first, if you build on it) and override:

    - `forward` (required);
    - `sparsify_inside = True` when the input must be transformed before the sparsity mask applies
      (BitNet's RMSNorm before quantization): the projection then calls `forward(x, sparsify)` and
      the block applies `sparsify` itself; otherwise it calls `forward(sparsify(x))`;
    - `operands`: None, or a method `operands(x, [sparsify,] expert=None) -> (x', W, b)` with
      `y = x'·Wᵀ + b` (called like `forward`), written to accept a leading expert dim on the
      parameters. With it a projection runs its output parts as separate matmuls and stacked MoE
      experts run as one grouped matmul; without it they run `forward` (experts one at a time);
    - `input_per_expert = True` when, as stacked experts, the input transform reads per-expert
      parameters (BitNet's norm gain): `operands` then gets the rows gathered, `expert` set;
    - `freezable = True` and `freeze()` when the block has a frozen storage (BitNet: packed 2-bit);
    - `inference_form(...)`: the module that replaces it for inference (default: itself);
    - `prepare_stacked(dtype)`: get ready for inference as stacked MoE experts (default: nothing);
    - `inference_nbytes()`: bytes of its storage in inference form (default: its tensors as held).
    """

    sparsify_inside: bool = False
    operands: Any = None
    input_per_expert: bool = False
    freezable: bool = False

    def freeze(self) -> None:
        """Switch to the frozen storage, irreversibly (only called when `freezable`; a frozen block's
        `freeze()` does nothing: `zoo.load` replays it before `zoo generate` asks again)."""

    def inference_form(self, sparsify: Sparsity, device: torch.device, dtype: torch.dtype,
                       impl: str = "auto") -> Weights:
        """The module that computes this projection at inference: an `InferenceForm` (or `self`).

        `sparsify` is the projection's sparsity block, `device` where the weights live, `dtype` the
        model's compute dtype, `impl` the kernels asked for ('auto', 'torch', 'cpu', 'triton'). The
        result must give the same outputs up to rounding and save the same state-dict keys."""
        return self

    def prepare_stacked(self, dtype: torch.dtype) -> None:
        """As stacked MoE experts (running through `operands` and the grouped matmul), prepare for
        inference in compute dtype `dtype` (BitNet keeps its unpacked weights)."""

    def inference_nbytes(self) -> int:
        """Bytes of this block's storage in inference form, every stacked expert included."""
        return _held_nbytes(self)


class InferenceForm(Weights):
    """What `prepare_inference` puts in place of a weights block. It is itself a `Weights`, always
    called with the projection's sparsity block: `forward(x, sparsify=None)` (x [..., in], the raw
    projection input) applies the sparsity (itself, or fused into its kernel) and the matmul.

    - `decode(x, sparsify)`: one token's row x [1, in] -> [1, out]; the per-token call of a decode
      loop (default: `forward`);
    - `fuses(sparsify)`: whether `decode` selects the kept entries inside its kernel (no separate
      sparsity pass; default False);
    - `bytes_per_token()`: the weight bytes one decoded token reads (default: all it holds).
    """

    sparsify_inside = True

    def decode(self, x: torch.Tensor, sparsify: Sparsity | None = None) -> torch.Tensor:
        return self(x, sparsify)

    def fuses(self, sparsify: Sparsity | None) -> bool:
        return False

    def bytes_per_token(self) -> int:
        return self.inference_nbytes()


class Preparable:
    """A part of the model that `zoo.kernels.prepare_inference(model, impl)` switches to its inference
    form: it calls `prepare_inference(dtype, impl)` on every such module (each projection, which asks
    its weights block for `inference_form`; the model, for its LM head). `dtype` is the model's compute
    dtype. Blocks do not subclass this: a weights block declares its form through `Weights`."""

    def prepare_inference(self, dtype: torch.dtype, impl: str = "auto") -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# sparsity: factory(cfg, ctx, width) -> Sparsity


class Sparsity(nn.Module):
    """A projection-input sparsifier: `forward(x) -> x'` (x with entries zeroed). Override:

    - `forward` (required);
    - `keep_fraction`: the expected fraction of entries kept per token (default 1.0): accounting
      counts that share of the projection's weights as activated;
    - `kept_count(width)`: K when exactly K < width entries of every row are kept, else None (the
      default). Inference forms with a sparse-input kernel read only those K weight rows;
    - `entries(x)`: the kept entries of rows x [N, width] as (values, indices) [N, K], what
      `forward` keeps; only asked when `kept_count` is not None (default: from `forward`);
    - `magnitude_topk = True` when the kept entries are exactly the K largest |x| of the row
      (ties to the lower index) and unscaled (K = `kept_count`, or the whole row when None): a
      kernel may then select them itself from the raw row (fusing the sparsity);
    - `zeros_inputs = True` when `forward`'s output has exact zeros that a kernel may skip, with no
      fixed K (`kept_count` None), about `keep_fraction` of each row nonzero: inference forms then
      multiply with a kernel that reads only the weight rows of the nonzero entries (decode), and
      count `keep_fraction` of those rows as read per token (`bytes_per_token`).
    """

    keep_fraction: float = 1.0
    magnitude_topk: bool = False
    zeros_inputs: bool = False

    def kept_count(self, width: int) -> int | None:
        return None

    def entries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.kept_count(x.shape[-1])
        if k is None:
            raise ValueError(f"{type(self).__name__} keeps no fixed number of entries per row")
        kept = self(x).detach()
        idx = kept.abs().topk(k, dim=-1, sorted=False).indices
        return kept.gather(-1, idx), idx


# ---------------------------------------------------------------------------------------------
# ffn: factory(cfg, ctx, d_model) -> FFN


class FFN(nn.Module):
    """A feed-forward block: `forward(x [..., d_model]) -> [..., d_model]`. Make every linear map with
    `ctx.projection(role, in, out, bias)`. Override:

    - `forward` (required);
    - `hidden`: the inner width, when there is one (a MoE sizes its shared experts from it);
    - `token_fraction`: the share of tokens that reach this block (accounting scales its activated
      parameters and FLOPs; a MoE sets top_k / num_experts on its experts);
    - `aux_losses`: auxiliary losses of the last forward ({name: scalar}), added to the training loss;
    - `routing_stats()`: after a forward, a routed FFN's statistics (`tokens_per_expert` [E],
      `router_entropy`, ...) for `zoo eval`; None (the default) for an FFN that routes nothing.
    """

    hidden: int | None = None
    token_fraction: float = 1.0
    aux_losses: Mapping[str, torch.Tensor] = MappingProxyType({})

    def routing_stats(self) -> Mapping[str, torch.Tensor] | None:
        return None


# ---------------------------------------------------------------------------------------------
# kernel-backend: factory(cfg, ctx) -> KernelBackend (the MoE expert matmuls, docs/moe.md)


class KernelBackend:
    """The grouped matmul of a MoE layer's stacked experts. Override:

    - `grouped_mm(x, w, offsets, rows=None) -> y` (required; the interface in zoo/kernels/grouped.py);
    - `grouped_mm_split(x, w, offsets, sizes, rows=None)`: `grouped_mm(...).split(sizes, -1)`, free
      to return separate contiguous parts (default: exactly that split);
    - `fuses_gather(x)`: whether `grouped_mm` should be given `rows` (the token gather fused into
      the kernel) rather than gathered rows (default True);
    - `check(ctx, moe_config)`: at build time, raise `ctx.error(...)` for a layer it cannot run;
    - `name`: shown in the model's repr.
    """

    @property
    def name(self) -> str:
        return type(self).__name__

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def grouped_mm_split(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, sizes: Sequence[int],
                         rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.grouped_mm(x, w, offsets, rows).split(list(sizes), -1)

    def fuses_gather(self, x: torch.Tensor) -> bool:
        return True

    def check(self, ctx: Any, moe_config: Any) -> None:
        """Raise `ctx.error(moe_config.backend, ...)` for a MoE layer this backend cannot run."""


# ---------------------------------------------------------------------------------------------
# dataset: factory(cfg, source) -> Corpus;  tokenizer: factory(cfg, corpus) -> Tokenizer


class Corpus:
    """A stream of text (slot `dataset`). Override `chunks()` and `fingerprint()` (both required)."""

    name: str = "corpus"

    def chunks(self) -> Iterator[str]:
        """Pieces of the text, each ending at a line break (memory stays flat)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes whenever the text may have changed (token caches are keyed on it)."""
        raise NotImplementedError


class Tokenizer:
    """text <-> ids (slot `tokenizer`). Set `vocab_size` and `fingerprint`; override `encode` and
    `decode` (required); `to_json()` is what a checkpoint stores (None: rebuilt from the recipe)."""

    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as an integer array (what the data pipeline uses)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def to_json(self) -> str | None:
        return None

    def stream_decoder(self):
        """A callable ids -> newly printable text, for printing tokens as they are generated."""
        seen: list[int] = []
        printed = [0]

        def step(ids: list[int]) -> str:
            seen.extend(ids)
            text = self.decode(seen)
            stable = text.rstrip("\ufffd")  # a partial multi-byte character is completed later
            new, printed[0] = stable[printed[0]:], max(printed[0], len(stable))
            return new

        return step


# ---------------------------------------------------------------------------------------------
# slots whose contract is the call alone: any nn.Module with this forward


class Norm(Protocol):
    """norm: factory(cfg, ctx, dim) -> module, `forward(x [..., dim]) -> [..., dim]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


class Activation(Protocol):
    """activation: factory(cfg, ctx) -> module, elementwise `forward(x) -> x`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


class Position(Protocol):
    """position: factory(cfg, ctx) -> module, `forward(q, k, start) -> (q, k)`, q/k [B, H, T, hd]."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(Protocol):
    """attention: factory(cfg, ctx) -> module, `forward(x [B, T, d_model], start=0, cache=None) -> [B, T, d_model]`
    (cache: the layer's `KVCache`, positions start..start+T-1). Make its projections with `ctx.projection`."""

    def forward(self, x: torch.Tensor, start: int = 0, cache: Any = None) -> torch.Tensor: ...


class Router(Protocol):
    """router: factory(cfg, ctx, d_model, num_experts, top_k) -> module, `forward(x [T, D]) -> Routing`
    (zoo.blocks.router.Routing: weights, experts, probs, logits; docs/moe.md)."""

    def forward(self, x: torch.Tensor) -> Any: ...


# slot -> its contract
CONTRACTS: dict[str, type] = {
    "weights": Weights, "sparsity": Sparsity, "ffn": FFN, "kernel-backend": KernelBackend,
    "dataset": Corpus, "tokenizer": Tokenizer,
    "norm": Norm, "activation": Activation, "position": Position, "attention": Attention, "router": Router,
}
CALLS = (Norm, Activation, Position, Attention, Router)  # satisfied by any module with that forward
# members a block must define itself (the base class's are placeholders)
REQUIRED: dict[type, tuple[str, ...]] = {
    KernelBackend: ("grouped_mm",), Corpus: ("chunks", "fingerprint"), Tokenizer: ("encode", "decode"),
}


def missing(slot: str, block: Any) -> str | None:
    """Why `block` does not satisfy `slot`'s contract (naming the missing member), or None.

    A slot without a declared contract (a plugin's own `registry.add_slot`) accepts anything."""
    contract = CONTRACTS.get(slot)
    if contract is None:
        return None
    if contract in CALLS or issubclass(contract, nn.Module):
        if not isinstance(block, nn.Module):
            return f"it returned {type(block).__name__}, not a torch.nn.Module"
        if type(block).forward is nn.Module.forward:
            return f"{type(block).__name__} defines no forward"
        if contract in CALLS:
            return None
    if not isinstance(block, contract):
        lacking = [n for n in _members(contract) if not hasattr(block, n)]
        return (f"{type(block).__name__} is not a zoo.contracts.{contract.__name__} subclass"
                + (f" (it has no {', '.join(lacking)})" if lacking else ""))
    for name in REQUIRED.get(contract, ()):
        if getattr(type(block), name) is getattr(contract, name):
            return f"{type(block).__name__} defines no {name}"
    return None


def _members(contract: type) -> list[str]:
    """The public members a contract base class declares (with those of the contract bases it extends)."""
    names: list[str] = []
    for cls in reversed(contract.__mro__):
        if cls.__module__ == __name__:
            names += [n for n in vars(cls) if not n.startswith("_") and n not in names]
    return names


def check(entry: Any, block: Any, path: str) -> None:
    """Raise PluginError when `block`, built by registry `entry` at recipe key `path`, breaks its slot's contract."""
    why = missing(entry.slot, block)
    if why is not None:
        raise PluginError(f"plugin {entry.plugin.name!r} ({entry.plugin.dist}): {entry.slot}.{entry.kind} at "
                          f"{path or '?'} breaks the {entry.slot} contract (zoo/contracts.py): {why}")


class BuildContext(Protocol):
    """What a block's factory may use of `ctx` (zoo.model.context.BuildContext implements it): the model's
    config and layer, this layer's block of a slot, building nested blocks, and the projection factory."""

    model: Any
    layer: int | None

    def block(self, slot: str) -> Any: ...
    def build(self, spec: Any, *args: Any) -> Any: ...
    def build_optional(self, spec: Any, *args: Any) -> Any: ...
    def projection(self, role: str, in_features: int, out_features: int, bias: bool) -> Any: ...
    def error(self, spec: Any, msg: str, key: str | None = None) -> Exception: ...
