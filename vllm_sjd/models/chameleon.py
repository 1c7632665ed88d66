"""Chameleon-family image generators (Lumina-mGPT, Anole) on vLLM's layers.

The text/image decoder of Chameleon: Llama-style blocks with per-head
LayerNorm on queries and keys (q_norm/k_norm, weights [heads, head_dim]) and,
for the 30B/34B checkpoints, "swin" norm placement. Paged attention, tensor-
parallel linear layers and rotary embeddings are vLLM's. Unlike vLLM's old
Chameleon (and transformers'), image-token logits are NOT masked: generating
them is the point. The VQGAN (model.vqmodel.*) is not part of the decoder;
its weights are skipped here and decoded separately (vllm_sjd/vq).
"""

from collections.abc import Iterable
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.model_executor.utils import set_weight_attrs
from vllm.sequence import IntermediateTensors

from vllm_sjd.core.denoising import NoiseSettings


def _head_sharded_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """q_norm/k_norm weights are [heads, head_dim]: keep this rank's heads."""
    shard = param.shape[0]
    if loaded.shape[0] != shard:  # replicated kv heads keep the full copy
        start = get_tensor_model_parallel_rank() * shard
        loaded = loaded.narrow(0, start % loaded.shape[0], shard)
    param.data.copy_(loaded)


class HeadLayerNorm(nn.Module):
    """LayerNorm over head_dim with a separate affine per head ([heads, head_dim])."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        for param in (self.weight, self.bias):
            set_weight_attrs(param, {"weight_loader": _head_sharded_loader})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, heads, head_dim]
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return x * self.weight + self.bias


class ChameleonMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size, bias, quant_config, prefix):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class ChameleonAttention(nn.Module):
    def __init__(self, config, cache_config: CacheConfig | None, quant_config, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", total_heads)
        assert total_heads % tp_size == 0
        self.num_heads = total_heads // tp_size
        self.num_kv_heads = max(1, total_kv_heads // tp_size)
        self.head_dim = config.hidden_size // total_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)

        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, total_heads, total_kv_heads,
            bias=bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            total_heads * self.head_dim, config.hidden_size, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        self.q_norm = HeadLayerNorm(self.num_heads, self.head_dim)
        self.k_norm = HeadLayerNorm(self.num_kv_heads, self.head_dim)
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=getattr(config, "max_position_embeddings", 4096),
            rope_parameters=getattr(config, "rope_parameters", None),
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads, cache_config=cache_config,
            quant_config=quant_config, prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.unflatten(-1, (self.num_heads, self.head_dim))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (self.num_kv_heads, self.head_dim))).flatten(-2)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class ChameleonDecoderLayer(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix: str):
        super().__init__()
        # 30B/34B checkpoints normalise the sub-layer outputs instead ("swin").
        self.swin_norm = getattr(config, "swin_norm", False)
        self.self_attn = ChameleonAttention(config, cache_config, quant_config, f"{prefix}.self_attn")
        self.mlp = ChameleonMLP(
            config.hidden_size, config.intermediate_size,
            getattr(config, "mlp_bias", False), quant_config, f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual):
        if self.swin_norm:
            if residual is not None:
                hidden_states = hidden_states + residual
            attended = self.input_layernorm(self.self_attn(positions, hidden_states))
            hidden_states = hidden_states + attended
            return self.post_attention_layernorm(self.mlp(hidden_states)), hidden_states
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class ChameleonModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: ChameleonDecoderLayer(
                config, vllm_config.cache_config, vllm_config.quant_config, prefix
            ),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # An SJD2 fine-tuned checkpoint carries a learned input vector per noise
        # level (vllm_sjd/core/denoising.py); loaded here, read only by the sjd2 method.
        sjd2 = NoiseSettings.of_config(config)
        if sjd2 is not None:
            self.sjd2_timestep_embedding = nn.Embedding(sjd2.noise_levels + 1, config.hidden_size)
        # The next forward's noisy inputs (feed_noisy_embeddings), and, when a
        # list, a record of every input fed that way (tests read it back).
        self._noisy_feed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.noisy_feed_log: list[dict] | None = None
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def feed_noisy_embeddings(self, index: torch.Tensor, embeds: torch.Tensor, levels: torch.Tensor) -> None:
        """SJD2: in the next forward pass, the tokens at `index` (of the flattened batch)
        enter as `embeds` [M, H] plus their levels' timestep vectors, not as their ids."""
        self._noisy_feed = (index, embeds, levels)

    def _with_noisy_inputs(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        (index, embeds, levels), self._noisy_feed = self._noisy_feed, None
        inputs = embeds.to(hidden_states.dtype) + self.sjd2_timestep_embedding(levels).to(hidden_states.dtype)
        if self.noisy_feed_log is not None:
            self.noisy_feed_log.append({"positions": positions[index].cpu(), "embeds": embeds.float().cpu(),
                                        "levels": levels.cpu(), "inputs": inputs.float().cpu()})
        return hidden_states.index_copy(0, index, inputs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            if self._noisy_feed is not None:
                hidden_states = self._with_noisy_inputs(hidden_states, positions)
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        if getattr(self.config, "swin_norm", False):
            return self.norm(hidden_states if residual is None else hidden_states + residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class ChameleonImageGenerator(nn.Module):
    """Registered as ChameleonXLLMXForConditionalGeneration (Lumina-mGPT) and
    ChameleonForConditionalGeneration (Anole); image tokens are generable."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        },
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = ChameleonModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def feed_noisy_embeddings(self, index: torch.Tensor, embeds: torch.Tensor, levels: torch.Tensor) -> None:
        self.model.feed_noisy_embeddings(index, embeds, levels)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ["model.vqmodel."]
        if getattr(self.config, "tie_word_embeddings", False):
            skip.append("lm_head.")
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=skip)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
