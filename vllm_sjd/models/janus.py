"""Janus-Pro's image generation path (transformers' JanusForConditionalGeneration) on vLLM's layers.

Janus-Pro is a Llama whose image tokens have their own input and output: a
code is embedded by `generation_embeddings` and lifted to the language model's
width by `generation_aligner` (Linear, GELU, Linear), and the next code is
predicted by `generation_head` (Linear, GELU, Linear to the codebook), not by
the text embedding and lm_head. The language model runs on vLLM's Llama
(paged attention, tensor parallelism); the generation modules are small and
replicated on every rank. The understanding path (SigLIP vision tower,
`aligner`) is not served: its weights are skipped, as are the VQ model's
(model.vqmodel.*, decoded by transformers' JanusVQVAE in vllm_sjd/vq/janus.py).

Token ids. vLLM keeps one vocabulary per model, so image codes get ids of
their own past the text vocabulary: code c is id text_vocab_size + c. The
engine's vocabulary is widened to hold them (patches/janus_vocab.py), the
text vocabulary's size is kept in the text config as `sjd_text_vocab_size`.
The logits are [-inf for the text ids | the generation head's code logits]:
the model makes images only, and the 102400-wide lm_head (as many FLOPs a
token as 6% of Janus-Pro-7B's forward, 14% of 1B's) is not run for them. It is
loaded all the same (`text_logits`), so that tests can compare it.
"""

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from vllm_sjd.checkpoints import CheckpointError, listing
from vllm_sjd.models.janus_config import text_vocab_size

LANGUAGE_MODEL = "model.language_model."
SKIPPED = ("model.vision_model.", "model.aligner.", "model.vqmodel.")


class GenerationAligner(nn.Module):
    """transformers' JanusVQVAEAlignerMLP: fc1, then (GELU, Linear) per hidden layer."""

    def __init__(self, vq_config) -> None:
        super().__init__()
        width = vq_config.projection_dim
        self.fc1 = nn.Linear(vq_config.embed_dim, width)
        self.hidden_layers = nn.ModuleList(
            nn.Linear(width, width) for _ in range(1, vq_config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(F.gelu(x))
        return x


class GenerationHead(nn.Module):
    """transformers' JanusVQVAEHead: proj_out, GELU, vision_head (to the codebook)."""

    def __init__(self, vq_config) -> None:
        super().__init__()
        self.proj_out = nn.Linear(vq_config.image_token_embed_dim, vq_config.projection_dim)
        self.vision_head = nn.Linear(vq_config.projection_dim, vq_config.num_embeddings)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vision_head(F.gelu(self.proj_out(hidden)))


class JanusImageGenerator(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if config.vq_config.hidden_act != "gelu":
            raise ValueError(f"Janus's generation modules use GELU, this config names "
                             f"{config.vq_config.hidden_act!r}")
        # The language model is built on the text vocabulary; the codes have their own embedding.
        text_config = copy.deepcopy(config.text_config)
        self.text_vocab_size = text_vocab_size(text_config)
        text_config.vocab_size = self.text_vocab_size
        self.num_codes = config.vq_config.num_embeddings
        self.model = LlamaModel(vllm_config=vllm_config.with_hf_config(text_config),
                                prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(self.text_vocab_size, text_config.hidden_size,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(self.text_vocab_size)
        self.generation_embeddings = nn.Embedding(self.num_codes, config.vq_config.embed_dim)
        self.generation_aligner = GenerationAligner(config.vq_config)
        self.generation_head = GenerationHead(config.vq_config)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text ids through the text embedding, code ids through the generation path."""
        is_code = input_ids >= self.text_vocab_size
        text = self.model.embed_input_ids(torch.where(is_code, 0, input_ids))
        codes = (input_ids - self.text_vocab_size).clamp(0, self.num_codes - 1)
        image = self.generation_aligner(self.generation_embeddings(codes)).to(text.dtype)
        return torch.where(is_code[:, None], image, text)

    def forward(self, input_ids, positions, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.model(None, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        codes = self.generation_head(hidden_states).float()
        text = codes.new_full((codes.shape[0], self.text_vocab_size), float("-inf"))
        return torch.cat([text, codes], dim=-1)

    def text_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """lm_head's logits over the text vocabulary: understanding's head, not served."""
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        own = dict(self.named_parameters())
        loaded: set[str] = set()
        unknown: list[str] = []

        def language_model_weights():
            for name, tensor in weights:
                if name.startswith(LANGUAGE_MODEL):
                    yield name[len(LANGUAGE_MODEL):], tensor
                elif name.startswith(SKIPPED):
                    continue
                elif name == "lm_head.weight":
                    own["lm_head.weight"].weight_loader(own["lm_head.weight"], tensor)
                    loaded.add(name)
                elif name.startswith("model.generation_"):
                    target = name[len("model."):]
                    if target not in own:
                        unknown.append(name)
                        continue
                    with torch.no_grad():
                        own[target].copy_(tensor)
                    loaded.add(target)
                else:
                    unknown.append(name)

        loaded |= {f"model.{n}" for n in self.model.load_weights(language_model_weights())}
        if unknown:
            raise CheckpointError(f"weights that are not part of Janus: {listing(unknown)}")
        missing = sorted(n for n in own if n.startswith("generation_") and n not in loaded)
        if missing:  # would stay random: the images would be noise
            raise CheckpointError(f"the checkpoint lacks Janus's generation weights: {listing(missing)}")
        if "lm_head.weight" not in loaded:  # tied to the text embedding
            self.lm_head.weight = self.model.embed_tokens.weight
            loaded.add("lm_head.weight")
        return loaded
