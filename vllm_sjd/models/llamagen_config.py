"""LlamaGen-T2I's checkpoint description: config.json of model_type "llamagen_t2i".

Facts from FoundationVision/LlamaGen (autoregressive/models/gpt.py,
autoregressive/sample/sample_t2i.py, autoregressive/models/generate.py):

- The text-to-image GPT is a Llama-style decoder (RMSNorm, SwiGLU, no biases)
  whose first `cls_token_num` (120) positions hold a caption: FLAN-T5-XL
  features (2048 wide) projected by the caption embedder (`cap_proj`, a
  two-layer MLP with tanh-GELU); then come the image codes. The output layer
  predicts the 16384 VQ-16 codes; the image is a bare grid (16x16 at 256 px,
  32x32 at 512 px), no end-of-line or end-of-image tokens.
- The null caption for classifier-free guidance is the learned
  `uncond_embedding` [120, caption_dim], projected by the same embedder.
- T5 captions shorter than 120 tokens are left-padded and the padding is
  masked out of attention (for the conditional and the unconditional stream
  alike). Since caption positions get a zero rotary table (their q and k are
  0), a masked, left-padded 120-row caption is the same computation as its L
  valid rows alone, with the image grid still starting at rotary index 120:
  this plugin feeds the L valid rows (vllm_sjd/models/llamagen.py explains the
  positions).

Token ids the vLLM model takes: image codes are ids 0..codebook_size-1 (also
the output vocabulary); id codebook_size + i is the null caption of caption
slot i (i < cls_token_num), which the model embeds as cap_proj(uncond_embedding[i]).
So `vocab_size` = codebook_size + cls_token_num; the null ids are never
generated (their logits are -inf).
"""

from transformers import AutoConfig, PretrainedConfig

ARCHITECTURE = "LlamaGenT2IForCausalLM"
MODEL_TYPE = "llamagen_t2i"

# LlamaGen's GPT sizes (gpt.py's GPT_models): layers, heads, width.
GPT_SIZES = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}
# Positions past the last image token that SJD's draft window may touch
# (rotary indices there are clamped to the last grid cell).
WINDOW_MARGIN = 64


def ffn_width(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


class LlamaGenConfig(PretrainedConfig):
    """config.json of a LlamaGen-T2I checkpoint folder (model_type "llamagen_t2i").

    The rotary table is LlamaGen's 2-D one; `rope_parameters` declares
    "mrope_section" only so that vLLM hands the model per-request positions
    (see LlamaGenT2IForCausalLM.get_mrope_input_positions).
    """

    model_type = MODEL_TYPE
    ignore_keys_at_rope_validation = {"mrope_section"}

    def __init__(
        self,
        hidden_size: int = 1280,
        num_hidden_layers: int = 36,
        num_attention_heads: int = 20,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        cls_token_num: int = 120,
        caption_dim: int = 2048,
        codebook_size: int = 16384,
        image_size: int = 256,
        downsample: int = 16,
        max_position_embeddings: int | None = None,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size or ffn_width(hidden_size)
        self.head_dim = hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.cls_token_num = cls_token_num
        self.caption_dim = caption_dim
        self.codebook_size = codebook_size
        self.image_size = image_size
        self.downsample = downsample
        self.grid_size = image_size // downsample
        for derived in ("vocab_size", "head_dim", "grid_size"):  # saved, but always recomputed
            kwargs.pop(derived, None)
        self.vocab_size = codebook_size + cls_token_num
        self.max_position_embeddings = max_position_embeddings or (
            cls_token_num + self.grid_size**2 + WINDOW_MARGIN
        )
        quarter = self.head_dim // 4
        self.rope_parameters = {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": [quarter, quarter],  # grid row, grid column
        }
        kwargs.pop("rope_parameters", None)
        kwargs.setdefault("architectures", [ARCHITECTURE])
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        if self.hidden_size % self.num_attention_heads or self.head_dim % 4:
            raise ValueError(
                f"hidden_size {hidden_size} / {num_attention_heads} heads must give a head_dim "
                "divisible by 4 (the 2-D rotary table splits it into row and column halves)"
            )
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} is not a multiple of downsample {downsample}")


def llamagen_config(gpt_model: str = "GPT-XL", image_size: int = 256, **overrides) -> LlamaGenConfig:
    """The config of a released checkpoint: t2i_XL_stage1_256.pt is ("GPT-XL", 256),
    t2i_XL_stage2_512.pt is ("GPT-XL", 512)."""
    if gpt_model not in GPT_SIZES:
        raise ValueError(f"unknown LlamaGen model {gpt_model!r}; known: {', '.join(GPT_SIZES)}")
    layers, heads, dim = GPT_SIZES[gpt_model]
    fields = dict(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=dim,
                  image_size=image_size)
    fields.update(overrides)
    return LlamaGenConfig(**fields)


def register_config() -> None:
    """Make AutoConfig (and so vLLM) read model_type "llamagen_t2i". Idempotent."""
    AutoConfig.register(MODEL_TYPE, LlamaGenConfig, exist_ok=True)
