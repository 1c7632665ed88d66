"""LlamaGen-T2I's GPT (t2i_XL_stage1_256.pt, t2i_XL_stage2_512.pt) on vLLM's layers.

The network is FoundationVision/LlamaGen's `Transformer` with model_type
"t2i" (autoregressive/models/gpt.py), rebuilt from vLLM's parts: paged
`Attention`, tensor-parallel QKV/merged-gate/row linears, `RMSNorm`,
vocab-parallel embedding and head. What is LlamaGen's own:

* The 2-D rotary table. Per head, the first half of the rotated pairs turns
  with the grid row, the second half with the grid column (frequencies
  base^(-4j/head_dim), j < head_dim/4, pairs interleaved as (x[2i], x[2i+1])).
  Rows 0..cls_token_num-1 of LlamaGen's table are ZERO (cos = sin = 0), not the
  identity: q and k of caption positions are zeroed, so every caption key
  scores 0 against every query. Image token k (row-major in the grid) uses row
  cls_token_num + k. Computed in float32 and cast back, as LlamaGen does.
* Positions. LlamaGen left-pads a caption of L < 120 T5 tokens and masks the
  padding out of attention (generate.py's emb_masks). vLLM's paged attention
  has no per-request key mask, but with the zero table the padded rows only
  ever add exp(0) terms, so dropping them is exact: the prompt holds the L
  valid rows. The image must still start at table row 120, whatever L is; the
  model asks vLLM for per-request positions through the M-RoPE interface
  (`get_mrope_input_positions`, the config declares "mrope_section"): caption
  rows get positions 120-L..119 (where LlamaGen puts them), the image
  continues at 120, 121, ... (delta 120 - L); all three M-RoPE rows are equal
  and only the first is read. Positions past the grid (SJD draft slots beyond
  the last image token) are clamped to the last cell.
* The caption. The conditional prompt arrives as vLLM prompt embeddings of
  width hidden_size: T5 features already projected by this checkpoint's
  caption embedder (vllm_sjd/llamagen_text.py). The null caption is
  model-owned: token id codebook_size + i embeds as
  cap_proj(uncond_embedding[i]), so the unconditional prompt is plain token
  ids (LlamaGenImageLayout.unconditional_prompt_token_ids).
* Logits: the head predicts the codebook; the null-caption ids are padded on
  as -inf so the logits cover vocab_size.

Checkpoint files (LlamaGen's .pt or our safetensors, key names, conversion):
vllm_sjd/models/llamagen_checkpoint.py.
"""

import re
from collections.abc import Iterable, Iterator
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.utils import (
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from vllm_sjd.checkpoints import ALLOWED_GLOBALS, CheckpointError, listing
from vllm_sjd.models.llamagen_checkpoint import checkpoint_entries
from vllm_sjd.models.llamagen_config import ARCHITECTURE

# --------------------------------------------------------------------------
# 2-D rotary table and its application (plain torch)
# --------------------------------------------------------------------------


def rotary_table_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """[cls_token_num + grid_size**2, head_dim // 2, 2] float32 (cos, sin) rows.

    Rows of caption positions are zero (LlamaGen's table); image cell
    (r, c) is row cls_token_num + r * grid_size + c.
    """
    quarter = head_dim // 4
    inv_freq = base ** (-torch.arange(quarter, dtype=torch.float64) * 4.0 / head_dim)
    index = torch.arange(grid_size, dtype=torch.float64)
    by_row = torch.outer(index, inv_freq)  # [G, hd/4]
    angles = torch.cat(
        [
            by_row[:, None, :].expand(grid_size, grid_size, quarter),  # row index
            by_row[None, :, :].expand(grid_size, grid_size, quarter),  # column index
        ],
        dim=-1,
    ).reshape(grid_size * grid_size, 2 * quarter)
    grid = torch.stack([angles.cos(), angles.sin()], dim=-1).float()
    return torch.cat([torch.zeros(cls_token_num, 2 * quarter, 2, dtype=torch.float32), grid])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: x [N, heads, head_dim], cos/sin [N, head_dim // 2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def mrope_positions(input_tokens, codebook_size: int, cls_token_num: int) -> tuple[torch.Tensor, int]:
    """([3, n] positions, delta) of a prompt, as LlamaGen places it.

    The caption is the run of leading null-caption ids (ids >= codebook_size),
    or, if there is none, the whole prompt (an embeddings prompt reaches here
    as 0..L-1). A caption of L rows takes positions 120-L..119; whatever
    follows (image codes) continues at 120.
    """
    ids = torch.as_tensor(list(input_tokens), dtype=torch.int64)
    n = ids.numel()
    leading_nulls = int((ids >= codebook_size).to(torch.int64).cumprod(0).sum()) if n else 0
    caption = leading_nulls or n
    delta = cls_token_num - caption
    positions = (torch.arange(n, dtype=torch.int64) + delta).clamp(min=0)
    return positions.expand(3, n).clone(), delta


# --------------------------------------------------------------------------
# The vLLM model
# --------------------------------------------------------------------------


class LlamaGenAttention(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        total_heads = config.num_attention_heads
        total_kv_heads = config.num_key_value_heads
        if total_heads % tp_size:
            raise ValueError(f"{total_heads} heads do not split over tensor parallel {tp_size}")
        self.num_heads = total_heads // tp_size
        self.num_kv_heads = max(1, total_kv_heads // tp_size)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, total_heads, total_kv_heads,
            bias=False, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            total_heads * self.head_dim, config.hidden_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads, cache_config=cache_config,
            quant_config=quant_config, prefix=f"{prefix}.attn",
        )

    def forward(self, cos: torch.Tensor, sin: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.unflatten(-1, (self.num_heads, self.head_dim)), cos, sin).flatten(-2)
        k = apply_rotary(k.unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin).flatten(-2)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class LlamaGenFeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), w1 and w3 merged."""

    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class LlamaGenBlock(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix: str):
        super().__init__()
        self.attention = LlamaGenAttention(config, cache_config, quant_config, f"{prefix}.attention")
        self.feed_forward = LlamaGenFeedForward(config, quant_config, f"{prefix}.feed_forward")
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, cos, sin, hidden_states, residual):
        # h = x + attn(norm(x)); out = h + ffn(norm(h)), with vLLM's fused add-norm.
        if residual is None:
            residual = hidden_states
            hidden_states = self.attention_norm(hidden_states)
        else:
            hidden_states, residual = self.attention_norm(hidden_states, residual)
        hidden_states = self.attention(cos, sin, hidden_states)
        hidden_states, residual = self.ffn_norm(hidden_states, residual)
        return self.feed_forward(hidden_states), residual


class CaptionMLP(nn.Module):
    """LlamaGen's cap_proj: fc2(gelu_tanh(fc1(x))), no biases (replicated: it is small)."""

    def __init__(self, caption_dim: int, hidden_size: int, prefix: str):
        super().__init__()
        self.fc1 = ReplicatedLinear(caption_dim, hidden_size, bias=False, prefix=f"{prefix}.fc1")
        self.fc2 = ReplicatedLinear(hidden_size, hidden_size, bias=False, prefix=f"{prefix}.fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.fc1(x)
        x, _ = self.fc2(F.gelu(x, approximate="tanh"))
        return x


class CaptionEmbedder(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        self.cap_proj = CaptionMLP(config.caption_dim, config.hidden_size, f"{prefix}.cap_proj")
        self.uncond_embedding = nn.Parameter(
            torch.zeros(config.cls_token_num, config.caption_dim), requires_grad=False
        )


class LlamaGenT2IForCausalLM(nn.Module, SupportsMRoPE):
    """LlamaGen-T2I's GPT; image codes 0..codebook_size-1 are generable."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.codebook_size = config.codebook_size
        self.cls_token_num = config.cls_token_num
        self.vocab_size = config.vocab_size
        self.tok_embeddings = VocabParallelEmbedding(
            config.codebook_size, config.hidden_size, prefix=maybe_prefix(prefix, "tok_embeddings")
        )
        self.cls_embedding = CaptionEmbedder(config, maybe_prefix(prefix, "cls_embedding"))
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: LlamaGenBlock(
                config, vllm_config.cache_config, vllm_config.quant_config, prefix
            ),
            prefix=maybe_prefix(prefix, "layers"),
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.output = ParallelLMHead(
            config.codebook_size, config.hidden_size, prefix=maybe_prefix(prefix, "output")
        )
        self.logits_processor = LogitsProcessor(config.codebook_size)
        self.register_buffer(
            "rotary_table",
            rotary_table_2d(config.grid_size, config.head_dim, config.rope_theta, config.cls_token_num),
            persistent=False,
        )
        # cap_proj(uncond_embedding): filled once the weights are in.
        self.register_buffer(
            "null_captions", torch.zeros(config.cls_token_num, config.hidden_size), persistent=False
        )
        self._null_captions_ready = False
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    # ---- inputs ---------------------------------------------------------

    def _refresh_null_captions(self, raw_weights: bool = False) -> None:
        """null_captions = cap_proj(uncond_embedding). raw_weights: straight from the
        loaded tensors (inside load_weights, before vLLM post-processes layers)."""
        embedder = self.cls_embedding
        with torch.no_grad():
            x = embedder.uncond_embedding.to(self.null_captions.device)
            if raw_weights:
                mlp = embedder.cap_proj
                rows = F.linear(F.gelu(F.linear(x, mlp.fc1.weight), approximate="tanh"), mlp.fc2.weight)
            else:
                rows = embedder.cap_proj(x)
            self.null_captions = rows.to(self.tok_embeddings.weight.dtype)
        self._null_captions_ready = True

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Image codes through the token table; null-caption ids to cap_proj(uncond)."""
        if not self._null_captions_ready:
            self._refresh_null_captions()
        is_null = input_ids >= self.codebook_size
        codes = torch.where(is_null, torch.zeros_like(input_ids), input_ids)
        slots = (input_ids - self.codebook_size).clamp(0, self.cls_token_num - 1)
        return torch.where(is_null[:, None], self.null_captions[slots], self.tok_embeddings(codes))

    def get_mrope_input_positions(self, input_tokens, mm_features) -> tuple[torch.Tensor, int]:
        return mrope_positions(input_tokens, self.codebook_size, self.cls_token_num)

    # ---- forward --------------------------------------------------------

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        flat = positions[0] if positions.dim() == 2 else positions  # [N]
        table = self.rotary_table[flat.clamp(0, self.rotary_table.shape[0] - 1)]
        cos, sin = table[..., 0], table[..., 1]  # [N, head_dim // 2] each
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(cos, sin, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.output, hidden_states)  # [N, codebook]
        if logits is None:
            return None
        # The null-caption ids are inputs only: never generated.
        return F.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=float("-inf"))

    # ---- weights --------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # vLLM's .pt iterator calls torch.load(weights_only=True) lazily, inside
        # this loop: allow the training "args" Namespace there too.
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            loaded = self._load(checkpoint_entries(weights))
        self._refresh_null_captions(raw_weights=True)
        return loaded

    def _load(self, entries: Iterator[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        kv = self.config.num_key_value_heads * self.config.head_dim
        q = self.config.num_attention_heads * self.config.head_dim
        loaded: set[str] = set()
        unexpected: list[str] = []

        def put(name: str, tensor: torch.Tensor, shard=None) -> None:
            if is_pp_missing_parameter(name, self):
                return
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(name)

        for name, tensor in entries:
            if name == "cls_embedding.embedding_table.weight":
                raise CheckpointError(
                    "this is a class-conditional (c2i) LlamaGen checkpoint; only t2i is supported"
                )
            if name.endswith(".attention.wqkv.weight"):
                target = name.replace(".wqkv.", ".qkv_proj.")
                wq, wk, wv = tensor.split([q, kv, kv], dim=0)
                for shard, part in (("q", wq), ("k", wk), ("v", wv)):
                    put(target, part, shard)
            elif name.endswith(".attention.wo.weight"):
                put(name.replace(".wo.", ".o_proj."), tensor)
            elif name.endswith((".feed_forward.w1.weight", ".feed_forward.w3.weight")):
                shard = 0 if ".w1." in name else 1
                put(re.sub(r"\.w[13]\.", ".gate_up_proj.", name), tensor, shard)
            elif name.endswith(".feed_forward.w2.weight"):
                put(name.replace(".w2.", ".down_proj."), tensor)
            elif name in params:
                put(name, tensor)
            else:
                unexpected.append(name)
        if unexpected:
            raise CheckpointError(
                f"weights that are not part of a LlamaGen-T2I GPT: {listing(sorted(unexpected))}"
            )
        return loaded


__all__ = [
    "ARCHITECTURE",
    "LlamaGenT2IForCausalLM",
    "apply_rotary",
    "mrope_positions",
    "rotary_table_2d",
]
