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
  caption embedder (vllm_sjd/models/llamagen_text.py). The null caption is
  model-owned: token id codebook_size + i embeds as
  cap_proj(uncond_embedding[i]), so the unconditional prompt is plain token
  ids (LlamaGenImageLayout.unconditional_prompt_token_ids).
* Logits: the head predicts the codebook; the null-caption ids are padded on
  as -inf so the logits cover vocab_size.

Checkpoint: LlamaGen's .pt (weights under "model", or "module"/"state_dict",
beside optimizer state, "steps" and the training "args" Namespace) read with
torch.load(weights_only=True) -- only argparse.Namespace is added to the
allowed globals, for "args" -- or a safetensors file with the same key names
(`write_model_dir` converts). Key names: tok_embeddings, layers.N.attention.
{wqkv,wo}, layers.N.feed_forward.{w1,w2,w3}, layers.N.{attention,ffn}_norm,
norm, output, cls_embedding.cap_proj.{fc1,fc2}, cls_embedding.uncond_embedding.
"""

import argparse
import pickle
import re
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path

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

from vllm_sjd.models.llamagen_layout import ARCHITECTURE, LlamaGenConfig, llamagen_config

# Entries of a LlamaGen training checkpoint that hold the weights, in the
# order sample_t2i.py looks for them.
WRAPPER_KEYS = ("model", "module", "state_dict")
# Prefixes torch.compile / DDP may leave on the keys.
STRIPPED_PREFIXES = ("_orig_mod.", "module.")
CAPTION_KEYS = ("cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight")


class LlamaGenCheckpointError(ValueError):
    """A file that is not a LlamaGen-T2I GPT checkpoint; the message says why."""


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
# Checkpoint files
# --------------------------------------------------------------------------


def _safe_torch_load(path: Path, **kwargs):
    """torch.load(weights_only=True), allowing argparse.Namespace ("args")."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
        except pickle.UnpicklingError as err:
            raise LlamaGenCheckpointError(
                f"{path}: refused -- it holds pickled objects other than tensors and "
                "plain containers, which weights_only loading does not execute"
            ) from err


def checkpoint_entries(
    weights: Iterable[tuple[str, object]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """LlamaGen weight names and tensors from a checkpoint's top-level items.

    A training checkpoint yields ("model", {...}), ("optimizer", {...}),
    ("steps", n), ("args", Namespace): the first wrapper entry (WRAPPER_KEYS
    order of appearance) is unpacked, the rest skipped. A flat state dict
    passes through. Compile/DDP prefixes are stripped; "freqs_cis" (a rotary
    cache some exports save) is dropped.
    """
    unwrapped = False
    for name, value in weights:
        if isinstance(value, Mapping):
            if name in WRAPPER_KEYS and not unwrapped:
                unwrapped = True
                yield from checkpoint_entries(value.items())
            continue
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in STRIPPED_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name == "freqs_cis":
            continue
        yield name, value


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files vLLM would read from a model folder: safetensors, else .pt."""
    folder = Path(model_dir)
    for pattern in ("*.safetensors", "*.pt"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(f"{folder}: no *.safetensors or *.pt weights")


def read_state_dict(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """LlamaGen GPT weights from a .pt (weights_only) or .safetensors file, or a
    model folder; `keys` restricts the result (and, for safetensors and
    memory-mapped .pt files, what is read)."""
    path = Path(path)
    files = weight_files(path) if path.is_dir() else [path]
    wanted = None if keys is None else set(keys)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = [n for n in f.keys() if wanted is None or n in wanted]
                state.update((n, f.get_tensor(n)) for n in names)
            continue
        try:
            loaded = _safe_torch_load(file, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            loaded = _safe_torch_load(file)
        if not isinstance(loaded, Mapping):
            raise LlamaGenCheckpointError(f"{file}: expected a dict, got {type(loaded).__name__}")
        for name, tensor in checkpoint_entries(loaded.items()):
            if wanted is None or name in wanted:
                state[name] = tensor
    if wanted is not None and (missing := sorted(wanted - set(state))):
        raise LlamaGenCheckpointError(f"{path}: missing {', '.join(missing)}")
    return state


def write_model_dir(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    gpt_model: str = "GPT-XL",
    image_size: int | None = None,
    safetensors: bool = True,
    **config_overrides,
) -> Path:
    """A folder vLLM can serve: config.json plus the weights.

    safetensors=True writes model.safetensors with the model weights under
    LlamaGen's own key names (fast to load, no pickle); False links the .pt
    into the folder (vLLM then reads it with weights_only=True). image_size
    defaults to the number in the file name (t2i_XL_stage1_256.pt -> 256).
    """
    checkpoint, out = Path(checkpoint), Path(out_dir)
    if image_size is None:
        match = re.search(r"_(256|384|512)\.", checkpoint.name)
        if match is None:
            raise ValueError(f"give image_size: {checkpoint.name} does not name 256, 384 or 512")
        image_size = int(match.group(1))
    config = llamagen_config(gpt_model, image_size, **config_overrides)
    state = read_state_dict(checkpoint)
    check_state_dict(state, config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        link = out / checkpoint.name
        if not link.exists():
            link.symlink_to(checkpoint.resolve())
    return out


def expected_shapes(config: LlamaGenConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of a LlamaGen-T2I GPT checkpoint and its shape."""
    d, hd = config.hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    shapes = {
        "tok_embeddings.weight": (config.codebook_size, d),
        "norm.weight": (d,),
        "output.weight": (config.codebook_size, d),
        "cls_embedding.cap_proj.fc1.weight": (d, config.caption_dim),
        "cls_embedding.cap_proj.fc2.weight": (d, d),
        "cls_embedding.uncond_embedding": (config.cls_token_num, config.caption_dim),
    }
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wqkv.weight"] = (qkv, d)
        shapes[p + "attention.wo.weight"] = (d, config.num_attention_heads * hd)
        shapes[p + "feed_forward.w1.weight"] = (config.intermediate_size, d)
        shapes[p + "feed_forward.w3.weight"] = (config.intermediate_size, d)
        shapes[p + "feed_forward.w2.weight"] = (d, config.intermediate_size)
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
    return shapes


def check_state_dict(state: Mapping[str, torch.Tensor], config: LlamaGenConfig) -> None:
    """Raise LlamaGenCheckpointError unless `state` is exactly the config's GPT."""
    if "cls_embedding.embedding_table.weight" in state:
        raise LlamaGenCheckpointError(
            "this is a class-conditional (c2i) LlamaGen checkpoint; only t2i is supported"
        )
    expected = expected_shapes(config)
    problems = []
    if missing := sorted(set(expected) - set(state)):
        problems.append(f"missing: {_listing(missing)}")
    if unexpected := sorted(set(state) - set(expected)):
        problems.append(f"unexpected: {_listing(unexpected)}")
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)}, config {v}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != v
    ]
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if problems:
        raise LlamaGenCheckpointError(
            "the checkpoint does not fit the config (right GPT size and image size?) -- "
            + "; ".join(problems)
        )


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


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
        with torch.serialization.safe_globals([argparse.Namespace]):
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
                raise LlamaGenCheckpointError(
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
            raise LlamaGenCheckpointError(
                f"weights that are not part of a LlamaGen-T2I GPT: {_listing(sorted(unexpected))}"
            )
        return loaded


__all__ = [
    "ARCHITECTURE",
    "LlamaGenCheckpointError",
    "LlamaGenT2IForCausalLM",
    "apply_rotary",
    "check_state_dict",
    "checkpoint_entries",
    "mrope_positions",
    "read_state_dict",
    "rotary_table_2d",
    "write_model_dir",
]
