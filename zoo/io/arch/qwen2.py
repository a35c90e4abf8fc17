"""Qwen2 (transformers `qwen2`, GGUF `qwen2`): LLaMA with q/k/v biases only."""

from __future__ import annotations

import dataclasses
from typing import Any

from zoo.errors import CheckpointError
from zoo.io.arch.llama import Llama, dense_config
from zoo.io.hf import HFConfig


class Qwen2(Llama):
    """Qwen2: LLaMA with q/k/v biases; GGUF `qwen2` (q/k rows not permuted: llama.cpp's NeoX RoPE)."""

    gguf = dataclasses.replace(Llama.gguf, arch="qwen2", permute_qk=False)

    def biases(self, cfg: HFConfig) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}

    def config(self, m) -> dict[str, Any]:
        attn, ffn = m.attention.config, m.ffn.config
        if not attn.qkv_bias or attn.o_bias or ffn.bias:
            raise CheckpointError("model: the qwen2 layout has q/k/v biases and no others "
                                  "(attention.qkv_bias = true, o_bias = false, ffn.bias = false)")
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **dense_config(m),
                "use_sliding_window": False, "sliding_window": None}


def register(registry) -> None:
    registry.register("converter", "qwen2", Qwen2, Qwen2)
