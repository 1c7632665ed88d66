"""Tiny random-weight LlamaGen-T2I checkpoints in LlamaGen's own format, a tiny
T5 encoder, and a plain-PyTorch reference forward.

The checkpoint is what LlamaGen's train_t2i.py saves: a .pt dict with the
weights under "model" (LlamaGen's key names: tok_embeddings, layers.N.attention.
wqkv, ..., cls_embedding.cap_proj.fc1, cls_embedding.uncond_embedding), beside
"optimizer", "steps" and the training "args" (an argparse.Namespace). The GPT
keeps LlamaGen's real geometry where it matters: 120 caption slots, 2-D rotary
table, SwiGLU width rule; it is only narrow (64 wide, 2 heads of 32) and
shallow, with a 512-code codebook and an 8x8 grid (128 px at 16x).

`reference_logits` is written from LlamaGen's description, not with vLLM: the
caption left-padded to 120 rows, padding masked out of attention (with the
diagonal kept, as generate.py does), the zero rotary rows for the caption,
image cells at rows 120 + k.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_sjd.models.llamagen_config import llamagen_config
from vllm_sjd.word_tokenizer import save_word_level_tokenizer

CODEBOOK = 512
IMAGE_SIZE = 128  # 8 x 8 codes at 16x
CAPTION_DIM = 32  # the tiny T5's d_model
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, caption_dim=CAPTION_DIM,
    codebook_size=CODEBOOK, max_position_embeddings=512,
)
WORDS = ["a", "red", "circle", "on", "black", "background", "blue", "square", "cat", "dog"]
CHECKPOINT_NAME = "t2i_tiny_stage1_128.pt"


def tiny_config(image_size: int = IMAGE_SIZE, **overrides):
    return llamagen_config("GPT-B", image_size, **{**TINY, **overrides})


def tiny_state_dict(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under LlamaGen's key names (norm weights perturbed too)."""
    from vllm_sjd.models.llamagen_checkpoint import expected_shapes

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "cls_embedding.uncond_embedding":
            state[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        else:
            # Wide enough logits that greedy choices are far from ties.
            state[name] = torch.randn(shape, generator=g) * shape[-1] ** -0.5
    state["output.weight"] *= 4.0
    return state


def build_tiny_llamagen(path: Path, *, seed: int = 0, wrapper: str = "model", **overrides) -> Path:
    """A model folder: config.json plus LlamaGen's .pt training checkpoint."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**overrides)
    config.save_pretrained(path)
    state = tiny_state_dict(config, seed)
    checkpoint = {
        wrapper: state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "steps": 1000,
        "args": argparse.Namespace(gpt_model="GPT-B", image_size=IMAGE_SIZE, cls_token_num=120),
    }
    torch.save(checkpoint, path / CHECKPOINT_NAME)
    return path


def build_tiny_t5(path: Path, *, seed: int = 0) -> Path:
    """A random T5 encoder (flan-t5's gated-gelu shape, d_model 32) and a word tokenizer
    that appends </s> as T5's does."""
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: 3 + i for i, w in enumerate(WORDS)})
    config = T5Config(
        vocab_size=len(vocab) + 3, d_model=CAPTION_DIM, d_kv=16, d_ff=64, num_layers=2,
        num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    T5EncoderModel(config).eval().save_pretrained(path)
    save_word_level_tokenizer(
        path, vocab, unk_token="<unk>",
        special_tokens={"pad_token": "<pad>", "eos_token": "</s>"}, append_eos="</s>",
    )
    return path


def write_tiny_vq16(path: Path, *, seed: int = 0):
    """VQ-16's shape (five levels: 16x) with few channels and the tiny model's
    512 codes, written as the image endpoint finds it: vq_ds16_t2i.safetensors
    and vq_config.json. Returns the decoder written."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from vllm_sjd.vq.llamagen_vq import LlamaGenVQConfig, LlamaGenVQDecoder

    config = LlamaGenVQConfig(codebook_size=CODEBOOK, z_channels=32, ch=32,
                              ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
    torch.manual_seed(seed)
    decoder = LlamaGenVQDecoder(config)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()},
              str(Path(path) / "vq_ds16_t2i.safetensors"))
    (Path(path) / "vq_config.json").write_text(json.dumps(asdict(config)))
    return decoder


def load_state(path: Path) -> dict[str, torch.Tensor]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(Path(path) / CHECKPOINT_NAME, weights_only=True)["model"]


# --------------------------------------------------------------------------
# Reference forward (plain PyTorch, LlamaGen's formulation)
# --------------------------------------------------------------------------


def _rms(x, w, eps):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _rotate(x, angles):
    # x [T, H, hd]; angles [T, hd/2] or None rows -> zero (caption rows).
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * angles[:, None, :]).flatten(-2).type_as(x)


def _angles(config, positions: torch.Tensor) -> torch.Tensor:
    """Complex rotation per (position, pair): 0 for caption slots, e^{i theta} on the grid."""
    hd, g, cls = config.head_dim, config.grid_size, config.cls_token_num
    freqs = 1.0 / config.rope_theta ** (torch.arange(0, hd // 2, 2).float() / (hd // 2))
    cell = (positions - cls).clamp(min=0)
    row, col = (cell // g).float(), (cell % g).float()
    theta = torch.cat([row[:, None] * freqs, col[:, None] * freqs], dim=-1)
    rot = torch.polar(torch.ones_like(theta), theta)
    return torch.where((positions < cls)[:, None], torch.zeros_like(rot), rot)


def reference_logits(
    config,
    state: dict[str, torch.Tensor],
    caption: torch.Tensor | None,
    image_tokens: list[int],
    caption_length: int | None = None,
    image_positions: list[int] | None = None,
) -> torch.Tensor:
    """LlamaGen's logits [L + len(image_tokens), codebook] at the positions of the
    L valid caption rows and the image tokens: row L - 1 + k predicts image
    token k (rows of padding slots are left out).

    caption: T5 rows [L, caption_dim] (left-padded to 120, padding masked), or
    None for the null caption of the last `caption_length` slots (the
    unconditional stream of a caption of that length). `image_positions`: the
    grid cell each image token takes (by default 0, 1, 2, ...).
    """
    cls, d = config.cls_token_num, config.hidden_size
    if caption is None:
        length = caption_length or cls
        rows = state["cls_embedding.uncond_embedding"]
    else:
        length = caption.shape[0]
        rows = torch.cat([caption.new_zeros(cls - length, caption.shape[1]), caption])
    valid = torch.arange(cls) >= cls - length  # left padding
    if caption is not None:
        rows = rows * valid[:, None]
    fc1, fc2 = state["cls_embedding.cap_proj.fc1.weight"], state["cls_embedding.cap_proj.fc2.weight"]
    h = torch.cat([
        F.linear(F.gelu(F.linear(rows, fc1), approximate="tanh"), fc2),
        F.embedding(torch.tensor(image_tokens, dtype=torch.long), state["tok_embeddings.weight"]),
    ])
    T = h.shape[0]
    positions = torch.arange(T)
    if image_positions is not None:
        positions[cls:] = cls + torch.tensor(image_positions, dtype=torch.int64)
    angles = _angles(config, positions)
    key_ok = torch.cat([valid, torch.ones(T - cls, dtype=torch.bool)])
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool)) & key_ok[None, :]
    mask |= torch.eye(T, dtype=torch.bool)
    H, hd = config.num_attention_heads, config.head_dim
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        x = _rms(h, state[p + "attention_norm.weight"], config.rms_norm_eps)
        q, k, v = F.linear(x, state[p + "attention.wqkv.weight"]).split(d, dim=-1)
        q = _rotate(q.view(T, H, hd), angles).transpose(0, 1)
        k = _rotate(k.view(T, H, hd), angles).transpose(0, 1)
        v = v.view(T, H, hd).transpose(0, 1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + F.linear(attn.transpose(0, 1).reshape(T, d), state[p + "attention.wo.weight"])
        x = _rms(h, state[p + "ffn_norm.weight"], config.rms_norm_eps)
        ffn = F.silu(F.linear(x, state[p + "feed_forward.w1.weight"])) * F.linear(
            x, state[p + "feed_forward.w3.weight"]
        )
        h = h + F.linear(ffn, state[p + "feed_forward.w2.weight"])
    h = _rms(h, state["norm.weight"], config.rms_norm_eps)
    return F.linear(h[cls - length :], state["output.weight"]).float()


def reference_greedy(config, state, caption, num_tokens: int, caption_length: int | None = None) -> list[int]:
    tokens: list[int] = []
    for _ in range(num_tokens):
        logits = reference_logits(config, state, caption, tokens, caption_length)
        tokens.append(int(logits[-1].argmax()))
    return tokens


def saved_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())
