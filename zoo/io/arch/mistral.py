"""Mistral (transformers `mistral`): LLaMA without biases; its sliding window caps max_seq_len."""

from __future__ import annotations

from typing import Any

from zoo.errors import CheckpointError
from zoo.io.arch.llama import Llama, dense_config
from zoo.io.hf import HFConfig


class Mistral(Llama):
    """Mistral: LLaMA without biases (llama.cpp stores it as GGUF `llama`, read by that converter)."""

    def biases(self, cfg: HFConfig) -> dict[str, bool]:
        return {"qkv_bias": False, "o_bias": False, "mlp_bias": False}

    def config(self, m) -> dict[str, Any]:
        attn, ffn = m.attention.config, m.ffn.config
        if attn.qkv_bias or attn.o_bias or ffn.bias:
            raise CheckpointError("model: the mistral layout has no biases (use --arch llama or qwen2)")
        return {"model_type": "mistral", "architectures": ["MistralForCausalLM"], **dense_config(m),
                "sliding_window": None}


def register(registry) -> None:
    registry.register("converter", "mistral", Mistral, Mistral)
