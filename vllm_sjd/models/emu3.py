"""Emu3-Gen (transformers' format, Emu3ForConditionalGeneration) on vLLM's layers.

Emu3's language model is a Llama (GQA, SwiGLU, RMSNorm, rope theta 1e6), so
vLLM's Llama implementation serves it: this class only points it at the text
config nested in Emu3Config and maps the checkpoint's names
(model.text_model.* -> model.*). The VQ model (model.vqmodel.*) is skipped here
and decoded separately (vllm_sjd/vq/emu3.py). Logits are not masked: visual
tokens are generable.
"""

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM

# checkpoint name prefix -> vLLM Llama name prefix
RENAMES = (
    ("text_model.model.", "model."),
    ("text_model.lm_head.", "lm_head."),
    ("model.text_model.", "model."),
)
VQ_PREFIXES = ("vqmodel.", "model.vqmodel.")


def _vllm_name(name: str) -> str:
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class Emu3ImageGenerator(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        text_config = getattr(vllm_config.model_config.hf_config, "text_config", None)
        if text_config is not None:
            vllm_config = vllm_config.with_hf_config(text_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        renamed = (
            (_vllm_name(name), tensor)
            for name, tensor in weights
            if not name.startswith(VQ_PREFIXES)
        )
        return super().load_weights(renamed)
