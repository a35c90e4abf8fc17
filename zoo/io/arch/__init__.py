"""Architecture converters: how one public model architecture maps to zoo, in both directions.

A converter is registered in the `converter` slot under its transformers `model_type`, through
the same `zoo_register` hook as any block, so a plugin adds an architecture the way it adds a
block (docs/plugins.md):

    registry.register("converter", "toy", ToyConverter, ToyConverter)

(the class is both the entry's config, a frozen dataclass without fields, and its factory:
`factory()` returns the converter). A converter declares both directions of both formats:

- `recipe(cfg)`: config.json -> the zoo `[model]` table (import);
- `rules(cfg)`: which HF tensors make each zoo tensor; import gathers by them, export scatters;
- `config(m)`: a zoo ModelConfig -> config.json (export; None: the architecture is import-only);
- `store(cfg, tensors)`: the transformers tensors as the folder stores them (export; BitNet packs);
- `gguf`: a `GGUFLayout` (llama.cpp architecture name, q/k permutation, and the tensor-name and
  metadata-key tables that map a GGUF file onto config.json and transformers names, read one
  way on import and the other on export), or None when the architecture has no GGUF form.

`zoo.io.hf` and `zoo.io.gguf` hold only the generic reading and writing; they find the
converter by `model_type` (or by `GGUFLayout.arch`) in the registry.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from zoo.errors import CheckpointError
from zoo.io.hf import SLOT, HFConfig, Rule, gather

SLOT_DOC = ("how a public model architecture (a transformers model_type; its GGUF form) maps to zoo "
            "blocks and tensor names, for import and export (docs/interop.md)")

# One module per built-in architecture, each with `register(registry)`.
MODULES = ["llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "olmoe", "bitnet"]

REQUIRED = object()  # a GGUF metadata key without a default


@dataclass(frozen=True)
class GGUFLayout:
    """How an architecture is stored in a llama.cpp GGUF file; the same tables read and write it.

    `tensors` maps transformers tensor names to GGUF ones ("{i}": the layer; "{e}": an expert, all
    experts of a layer being one stacked GGUF tensor); `keys` lists (GGUF metadata key after
    "<arch>.", config.json key, type, default), where the default is REQUIRED, None (the key is
    left out of config.json) or a function of the keys before it. `fixed` lists config.json
    entries the GGUF form implies, (key, value, why): import sets them, export refuses another
    value with `why` (None: set on import only).
    """

    arch: str
    permute_qk: bool  # llama.cpp permuted q/k rows for its interleaved RoPE (undone on import)
    tensors: Mapping[str, str]
    keys: tuple[tuple[str, str, type, Any], ...]
    experts: bool = False  # the mixture-of-experts form of `arch` (GGUF files with <arch>.expert_count > 0)
    fixed: tuple[tuple[str, Any, str | None], ...] = ()
    ternary: tuple[str, ...] = ()  # transformers names ("{i}") of ternary projections (TQ1_0 / TQ2_0)
    flat: tuple[str, ...] = ()  # transformers names of [1, n] tensors that GGUF stores as [n]

    def slot(self, hf: str) -> tuple[str, int | None]:
        """(GGUF name, expert index or None) of a transformers tensor name (CheckpointError if none)."""
        layer = re.search(r"\.layers\.(\d+)\.", hf)
        expert = re.search(r"\.experts\.(\d+)\.", hf)
        pattern = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", re.sub(r"\.layers\.\d+\.", ".layers.{i}.", hf))
        if pattern not in self.tensors:
            raise CheckpointError(f"no GGUF name for tensor {hf!r}")
        return self.tensors[pattern].format(i=layer.group(1) if layer else ""), int(expert.group(1)) if expert else None

    def gguf_name(self, hf: str) -> str:
        """The GGUF name of a transformers tensor name (CheckpointError if the layout has none)."""
        return self.slot(hf)[0]

    def pattern(self, hf: str) -> str:
        """`hf` with its layer number as "{i}" (how `ternary` and `flat` name tensors)."""
        return re.sub(r"\.layers\.\d+\.", ".layers.{i}.", hf)


@dataclass(frozen=True)
class Converter:
    """One architecture: a converter with no options (subclasses add none either)."""

    known: ClassVar[frozenset[str]] = frozenset()  # architecture-specific config.json keys `recipe` reads
    gguf: ClassVar[GGUFLayout | None] = None
    # zoo ModelConfig -> config.json for `zoo export hf`; None: the architecture is import-only.
    config: ClassVar[Callable[..., dict[str, Any]] | None] = None
    # Recipe keys away from their defaults that `config` writes itself (e.g. "model.attention.qk_norm",
    # "model.layers"); `zoo export` refuses any other non-default block option, weights or pattern.
    exports: ClassVar[frozenset[str]] = frozenset()
    # bumped when the mapping changes, so that catalogue imports made by an older one are redone
    version: ClassVar[int] = 1

    def recipe(self, cfg: HFConfig) -> dict[str, Any]:
        """config.json -> the zoo `[model]` table of a model computing the same function."""
        raise NotImplementedError

    def rules(self, cfg: HFConfig) -> list[Rule]:
        """Which HF tensors make each zoo tensor; import gathers by them, export scatters."""
        raise NotImplementedError

    def check_quantization(self, cfg: HFConfig) -> None:
        """Refuse a `quantization_config` (architectures that read their own override this)."""
        q = cfg.data.get("quantization_config")
        if q is not None:
            method = q.get("quant_method", q) if isinstance(q, dict) else q
            raise cfg.error("quantization_config", f"quantized checkpoints ({method!r}) are not supported "
                                                   "(only BitNet's own); convert a full-precision folder")

    def store(self, cfg: HFConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The transformers tensors (scattered by `rules`) as the model folder stores them."""
        return tensors

    def load(self, cfg: HFConfig, model, get: Callable[[str], torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """The zoo state dict of `model` from the HF-named tensors `get` serves (default: by `rules`)."""
        return gather(self.rules(cfg), get, model.state_dict(), where)


def register(registry) -> None:
    """Declare the `converter` slot and register the built-in architectures."""
    registry.add_slot(SLOT, SLOT_DOC)
    for name in MODULES:
        importlib.import_module(f"zoo.io.arch.{name}").register(registry)
