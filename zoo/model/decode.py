"""The decode engine: generation whose per-token cost outside the weight reads is small.

A decode step of an eager model makes several hundred small calls per token (each layer's norms,
RoPE, cache writes, residual adds, projections), each costing microseconds of Python and dispatch
while the GEMVs themselves read the weights in tens of microseconds. `Decoder` keeps the model's own
blocks and their inference forms (whatever `zoo.kernels.prepare_inference` put in place) and removes
that overhead:

- the step of a run of consecutive layers built alike is compiled once (`torch.compile`, Inductor)
  and reused by every such run of the model and at every position: the layers share their code,
  their weights are graph inputs, and the position is a symbolic integer. Inductor fuses the norms,
  RoPE, cache writes and residual adds into a few generated loops and calls the projections'
  kernels (zoo's compiled GEMVs are registered torch ops, `zoo.kernels.cpu`) straight from the
  compiled code. A compiled call costs tens of microseconds of its own (guards, wrappers) whatever
  it computes, so one call runs up to `LAYERS_PER_CALL` layers (a 30-layer model: 3 calls of 10
  layers; on a 30-layer model with negligible weights, 2.2-2.5 ms per token against 3.6 for 30 calls
  of one layer, measured); the whole depth in one graph compiled for a minute and ran no faster;
- after the first compiled step, each run of layers calls its compiled graph directly (`DirectCall`),
  bound once to the run's tensors, without the guards torch.compile evaluates at every call (hundreds
  of microseconds for a run of 10 layers); a graph that could not be bound soundly (see `Graph`) keeps
  torch.compile's call;
- the KV cache is preallocated for the prompt plus the tokens asked for, not `max_seq_len`;
- the prompt (prefill) runs the same blocks eagerly on all its tokens at once (batched matmuls),
  and only its last position goes through the final norm and the LM head.

A projection whose weights block declares no inference form (zoo/contracts.py: it keeps the default
`inference_form`) is named in one notice and runs its own forward inside the compiled step. A layer
the compiler cannot capture as one graph (a plugin's untraceable code; the built-in blocks all
compile, a MoE layer through its static-shape decode dispatch, `MoE.pair_dispatch`) runs eagerly,
said in one line for its kind (see `CompiledLayers`). Either way the logits are those of the eager
model, up to rounding.

`compile` defaults to the environment variable ZOO_COMPILE (unset: on; `0`: the eager layers).
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from zoo.contracts import InferenceForm, Weights
from zoo.errors import ZooError
from zoo.model.projection import Projection

if TYPE_CHECKING:
    from zoo.model.transformer import Transformer

class KVCache:
    """Preallocated keys and values of one layer: [batch, kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator=None) -> torch.Tensor:
    """Next ids [B, 1] from logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


# a process decoding several differently shaped models (tests, benchmarks) keeps compiling instead of
# silently running eagerly after the eighth kind
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


LAYERS_PER_CALL = 10  # most layers one compiled call runs (see the module's docstring)


def run_layers(blocks: list[nn.Module], x: torch.Tensor, start: int, caches: list[KVCache]) -> torch.Tensor:
    for block, cache in zip(blocks, caches):
        x = block(x, start=start, cache=cache)
    return x


class CompiledLayers:
    """`run_layers` compiled for runs of one length of blocks built alike (shared by every such run of every
    model).

    The run must be one graph (`fullgraph=True`). Blocks the compiler cannot capture whole (a graph
    break: a plugin's untraceable code) run eagerly, said in one line for their kind: the continuation
    frames torch.compile would compile around a graph break belong to the blocks' own functions, shared
    by every kind of block, and its guards check tensors' shapes and dtypes but not every setting a
    module holds (an activation's kind, a norm's eps), so a continuation compiled for one kind could run
    for another. For the same reason each kind and run length gets a copy of `run_layers` with its own
    code object, so its own compiled graphs.

    Each graph Inductor compiles is kept with the places its inputs came from (`Graph`): a decoder calls it
    directly once its steps ran (`direct`), without the guards torch.compile evaluates at every call."""

    def __init__(self, index: int, kind: str, wrapper: str = "cpp"):
        code = run_layers.__code__.replace(co_name=f"run_layers_{index}")
        self.wrapper = wrapper  # Inductor's wrapper code around the graph's kernels: "cpp" or "python"
        self.fn = torch.compile(types.FunctionType(code, run_layers.__globals__, code.co_name), dynamic=True,
                                fullgraph=True, backend=self.inductor)
        self.kind, self.eager = kind, False
        self.graphs: list[Graph | None] = []  # every graph compiled, None where it cannot be called directly

    def inductor(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        """torch.compile's backend: Inductor's compiled graph, noted with where its inputs come from."""
        from torch._inductor import config
        from torch._inductor.compile_fx import compile_fx

        with config.patch(cpp_wrapper=self.wrapper == "cpp"):
            fn = compile_fx(gm, example_inputs)
        self.graphs.append(Graph.of(gm, fn))
        return fn

    def __call__(self, blocks: list[nn.Module], x: torch.Tensor, start: int, caches: list[KVCache]) -> torch.Tensor:
        if not self.eager:
            try:
                return self.fn(blocks, x, start, caches)
            except Exception as err:  # raised while tracing, before anything ran
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                print(f"zoo: decode: {self.kind} layers run eagerly (not compilable as one graph: {reason[:160]})",
                      file=sys.stderr)
                self.eager = True
        return run_layers(blocks, x, start, caches)

    def direct(self, blocks: list[nn.Module], caches: list[KVCache]) -> DirectCall | None:
        """This run of blocks as a direct call of the one graph compiled for its kind, or None where there is
        not exactly one graph that can be called so (eager, recompiled, or with effects outside the graph)."""
        if self.eager or len(self.graphs) != 1 or self.graphs[0] is None:
            return None
        return self.graphs[0].bind(blocks, caches)


class Graph:
    """An Inductor graph of `run_layers` that can run without torch.compile's frame and guards: its inputs
    are the blocks' tensors (fixed for a decoder's life: a model changed after its `Decoder` was made needs
    a new one), the hidden state `x` and the position `start`, and nothing else.

    Built from what the compiler recorded while tracing (the source of each input); a graph is not called
    directly (None) where the frame does more than return the graph's one output (Python side effects: a
    block setting an attribute), where the position was specialized or tied to another size, or where
    another input's value depends on the call."""

    def __init__(self, fn, sources: list[str], as_tensor: list[bool]):
        self.fn, self.sources = fn, sources  # fn(*inputs), as torch.compile's frame calls it
        self.as_tensor = as_tensor  # inputs the frame passes as 0-d tensors (a float setting made an input)

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, fn) -> Graph | None:
        try:  # torch.compile's tracing state: private, so any surprise means "not directly"
            from torch._dynamo.symbolic_convert import InstructionTranslator

            output = InstructionTranslator.current_tx().output
            sources = [arg.source.name for arg in output.graphargs]
            (returned,) = [n for n in gm.graph.nodes if n.op == "output"]
            if effects(output.side_effects) or len(returned.args[0]) != 1 or "L['start']" not in sources:
                return None
            if any(s.startswith(("L['x']", "L['start']")) and s not in ("L['x']", "L['start']") for s in sources):
                return None
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            if len(placeholders) != len(sources):
                return None
            position = placeholders[sources.index("L['start']")].meta["example_value"]
            symbol, shape_env = position.node.expr, output.shape_env
            if [s.name for s in shape_env.var_to_sources.get(symbol, [])] != ["L['start']"] \
                    or symbol in shape_env.replacements:
                return None
            return cls(fn, sources, [bool(arg.pass_arg_as_tensor) for arg in output.graphargs])
        except Exception:
            return None

    def bind(self, blocks: list[nn.Module], caches: list[KVCache]) -> DirectCall | None:
        scope = {"L": {"blocks": blocks, "caches": caches}, "G": run_layers.__globals__, "torch": torch,
                 "device": torch.device}
        try:
            args = [None if s in ("L['x']", "L['start']") else eval(s, scope) for s in self.sources]  # noqa: S307
            args = [torch._as_tensor_fullprec(a) if t else a for a, t in zip(args, self.as_tensor)]
        except Exception:
            return None
        return DirectCall(self, args, self.sources.index("L['x']") if "L['x']" in self.sources else None,
                          self.sources.index("L['start']"))


def effects(side_effects) -> bool:
    """Whether the traced frame changes Python state the graph does not (torch.compile replays such changes
    after the graph: an attribute set, a list or dict changed). Not effects: an object the frame created and
    set nothing on (a tensor allocated in the graph), and attributes set back to the constant they held (a
    context manager's set and reset)."""
    from torch._dynamo.variables.base import AttributeMutationExisting, AttributeMutationNew
    from torch._dynamo.variables.constant import ConstantVariable

    def restored(var) -> bool:
        stores = side_effects.store_attr_mutations.get(var, {})
        obj = getattr(var, "value", None)
        return isinstance(var.mutation_type, AttributeMutationExisting) and obj is not None and all(
            isinstance(v, ConstantVariable) and name in vars(obj) and vars(obj)[name] is v.value
            for name, v in stores.items())

    def harmless(var) -> bool:
        if isinstance(var.mutation_type, AttributeMutationNew):
            return not side_effects.store_attr_mutations.get(var)
        return restored(var)

    return bool(side_effects.tensor_hooks or side_effects.save_for_backward) or not all(
        map(harmless, side_effects._get_modified_vars()))


class DirectCall:
    """One run of layers bound to its compiled graph: call(x, start) -> x."""

    def __init__(self, graph: Graph, args: list, x: int | None, start: int):
        self.graph, self.args, self.x, self.start = graph, args, x, start

    def __call__(self, x: torch.Tensor, start: int) -> torch.Tensor:
        args = list(self.args)
        if self.x is not None:
            args[self.x] = x
        args[self.start] = start
        return self.graph.fn(*args)[0]


_COMPILED: dict[tuple, CompiledLayers] = {}


def layer_groups(blocks: list[nn.Module], most: int = LAYERS_PER_CALL) -> list[tuple[int, int, CompiledLayers]]:
    """(first, end, compiled step) covering the blocks in order: consecutive blocks of one kind in runs of at
    most `most` (see `run_lengths`), each run's step shared by every run of its kind and length, in every model.

    A kind is the blocks' structure (`structure`) less the settings that differ between blocks built
    alike within the model (a layer index: metadata, the same code runs)."""
    shapes = [structure(b) for b in blocks]
    varying = set()
    for s in shapes:
        first = next(t for t in shapes if same_build(t, s))
        for (*_, attrs, _), (*_, other, _) in zip(s, first):
            varying.update(k for k in attrs if attrs[k] != other[k])
    keys = [tuple((path, cls, tuple(sorted((k, v) for k, v in attrs.items() if k not in varying)), tensors)
                  for path, cls, attrs, tensors in s) for s in shapes]
    out, i = [], 0
    while i < len(blocks):
        end = i
        while end < len(blocks) and keys[end] == keys[i]:
            end += 1
        for n in run_lengths(end - i, most):
            key = (keys[i], n, wrapper())
            if key not in _COMPILED:
                kind = f"{type(blocks[i].attn).__name__} + {type(blocks[i].ffn).__name__}"
                _COMPILED[key] = CompiledLayers(len(_COMPILED), kind, key[2])
            out.append((i, i + n, _COMPILED[key]))
            i += n
    return out


def wrapper() -> str:
    """The compiled steps' wrapper code: ZOO_DECODE_WRAPPER, "cpp" (default) or "python"."""
    value = os.environ.get("ZOO_DECODE_WRAPPER", "cpp")
    if value not in ("cpp", "python"):
        raise ZooError(f"ZOO_DECODE_WRAPPER must be 'cpp' or 'python', got {value!r}")
    return value


def run_lengths(n: int, most: int) -> list[int]:
    """n consecutive layers in runs of at most `most`, as few distinct lengths as possible (each length is one
    compile): equal runs when a length in (most/2, most] divides n, else runs of `most` and the rest."""
    if n <= most:
        return [n]
    even = next((d for d in range(most, most // 2, -1) if n % d == 0), None)
    return [even] * (n // even) if even else [most] * (n // most) + ([n % most] if n % most else [])


def structure(block: nn.Module) -> list[tuple]:
    """What makes two blocks run the same code: for each submodule its path, class, settings (plain
    attributes) and its tensors' shapes and dtypes."""
    plain = (bool, int, float, str, type(None))
    return [(path, f"{type(m).__module__}.{type(m).__qualname__}",
             {k: v for k, v in vars(m).items() if isinstance(v, plain) and k != "training"},
             tuple((n, tuple(t.shape), t.dtype) for n, t in (*m.named_parameters(recurse=False),
                                                             *m.named_buffers(recurse=False)) if t is not None))
            for path, m in block.named_modules()]


def same_build(a: list[tuple], b: list[tuple]) -> bool:
    """Whether two structures have the same submodules, classes, setting names and tensors."""
    return len(a) == len(b) and all(x[:2] == y[:2] and x[2].keys() == y[2].keys() and x[3] == y[3]
                                    for x, y in zip(a, b))


class Decoder:
    """Generation state of one model: its KV cache and the steps over runs of layers (compiled, or eager).

    `max_len` sizes the cache (default: the model's max_seq_len); `compile=False` runs the layers
    eagerly (None: ZOO_COMPILE, default on).
    """

    def __init__(self, model: Transformer, batch: int = 1, max_len: int | None = None, compile: bool | None = None,
                 layers_per_call: int = LAYERS_PER_CALL):
        cfg, p = model.config, model.embed.weight
        self.model, self.batch = model, batch
        self.max_len = cfg.max_seq_len if max_len is None else min(max_len, cfg.max_seq_len)
        self.cache = [KVCache(batch, cfg.kv_heads, self.max_len, cfg.head_size, p.device, p.dtype)
                      for _ in model.blocks]
        for kv in self.cache:  # only the position is symbolic in the compiled step
            torch._dynamo.mark_static(kv.k)
            torch._dynamo.mark_static(kv.v)
        if compile is None:
            compile = os.environ.get("ZOO_COMPILE", "1") not in ("0", "", "off", "false")
        blocks = list(model.blocks)
        # (blocks, caches, step) per call: the lists are built once, the compiled steps' guards see the same ones
        self.calls = [(blocks[i:j], self.cache[i:j], step) for i, j, step in
                      (layer_groups(blocks, layers_per_call) if compile else [(0, len(blocks), run_layers)])]
        self.pos = 0
        # per call, its `DirectCall` (or None: through torch.compile) once a compiled step ran, for hidden states
        # of the shape and dtype that step had
        self.direct: list[DirectCall | None] | None = None
        self.direct_for: tuple | None = None
        plain = sorted({type(m.linear).__name__ for m in model.modules() if isinstance(m, Projection)
                        and not isinstance(m.linear, InferenceForm)
                        and type(m.linear).inference_form is Weights.inference_form})
        if plain:
            print(f"zoo: decode: weights {', '.join(plain)} declare no inference form; their projections run "
                  "their own forward" + (" (compiled where torch.compile can trace it)" if compile else ""),
                  file=sys.stderr)

    @property
    def compiled(self) -> bool:
        """Whether steps run compiled layers (False when none compiled: every layer eager)."""
        return any(isinstance(step, CompiledLayers) and not step.eager for *_, step in self.calls)

    def logits(self, ids: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """Logits [B, V] of the last of `ids` [B, T], placed at positions pos..pos+T-1 (cache written); the
        compiled steps when `compiled`, else every layer eagerly."""
        if self.pos + ids.shape[1] > self.max_len:
            raise ValueError(f"sequence of {self.pos + ids.shape[1]} tokens exceeds the cache ({self.max_len})")
        m = self.model
        x = m.embed(ids)
        inference = compiled and not torch.is_grad_enabled()
        shape = (x.shape, x.dtype)
        direct = self.direct if inference and self.direct_for == shape else None
        if compiled:
            torch._dynamo.mark_static(x)
        for i, (blocks, caches, step) in enumerate(self.calls):
            if direct and direct[i] is not None:
                x = direct[i](x, self.pos)
            else:
                x = (step if compiled else run_layers)(blocks, x, self.pos, caches)
        self.pos += ids.shape[1]
        if inference and self.direct is None:
            self.direct = [step.direct(blocks, caches) if isinstance(step, CompiledLayers) else None
                           for blocks, caches, step in self.calls]
            self.direct_for = shape
        return m.head(m.norm(x[:, -1]))

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt [B, T] from position 0, all tokens at once (eager, batched): the last logits [B, V]."""
        self.pos = 0
        return self.logits(ids)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per row, ids [B, 1], at the next position: its logits [B, V]."""
        if self.compiled:
            torch._dynamo.mark_static(ids)
            return self.logits(ids, compiled=True)
        return self.logits(ids)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator=None) -> Iterator[torch.Tensor]:
        """Sample continuations of idx [B, T]; yields one [B, 1] tensor of ids per step."""
        logits = self.prefill(idx)
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p, generator)
            yield nxt
            if self.pos >= self.max_len:
                return
            logits = self.step(nxt)
