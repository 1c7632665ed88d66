"""Tiny random-weight Emu3-Gen checkpoints in transformers' format.

Emu3ForConditionalGeneration saved as sharded safetensors with an index, real
key names (text_model.model.layers.N..., text_model.lm_head.weight, vqmodel.*), a
vocabulary_map with Emu3's special and visual token names, and a word-level
tokenizer standing in for Emu3's.
"""

import json
from pathlib import Path

import torch

from vllm_sjd.layouts import emu3 as el
from vllm_sjd.word_tokenizer import save_word_level_tokenizer

NUM_CODES = 512
FIRST_VISUAL_ID = 100
VOCAB_SIZE = FIRST_VISUAL_ID + NUM_CODES + 28
WORDS = ["a", "red", "circle", "on", "black", "background", "masterpiece,", "film",
         "grained,", "best", "quality.", "lowres,"]
FIRST_WORD_ID = 40
SPECIALS = {
    "<|endoftext|>": 0, el.END_OF_LINE: 10, el.END_OF_FRAME: 11, el.IMAGE_START: 12,
    el.IMAGE_END: 13, el.IMAGE_WRAPPER: 14, "<|extra_203|>": 15, el.END_OF_SEQUENCE: 16,
    "<image>": 18, "<unk>": 19,
}


def vocabulary_map() -> dict[str, int]:
    vocab = dict(SPECIALS)
    vocab.update({word: FIRST_WORD_ID + i for i, word in enumerate(WORDS)})
    vocab.update({f"{el.VISUAL_TOKEN_PREFIX}{c:06d}|>": FIRST_VISUAL_ID + c for c in range(NUM_CODES)})
    return vocab


def tiny_vq_config() -> dict:
    # 8x spatial downsampling like Emu3's vision tokenizer, tiny channels.
    return dict(codebook_size=NUM_CODES, embed_dim=4, latent_channels=4, base_channels=32,
                channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                hidden_size=32, temporal_downsample_factor=4)


def build_tiny_emu3(path: Path, *, seed: int = 0) -> Path:
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    config = Emu3Config(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048, bos_token_id=15, eos_token_id=16,
                         pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        vq_config=tiny_vq_config(),
        vocabulary_map=vocabulary_map(),
    )
    model = Emu3ForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vqmodel" not in name and param.dim() > 1:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="200KB")
    saved = json.loads((path / "config.json").read_text())
    saved["architectures"] = ["Emu3ForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(saved, indent=2))

    save_word_level_tokenizer(
        path, vocabulary_map(), unk_token="<unk>",
        special_tokens={"bos_token": "<|extra_203|>", "eos_token": el.END_OF_SEQUENCE,
                        "pad_token": "<|endoftext|>"},
        additional_special_tokens=[el.IMAGE_START, el.IMAGE_WRAPPER, el.IMAGE_END,
                                   el.END_OF_LINE, el.END_OF_FRAME],
    )
    return path


def reference_logits(path: Path, token_ids: list[int], positions: list[int] | None = None) -> torch.Tensor:
    """[len, V] logits of transformers' Emu3 text model on the same weights
    (token i at `positions[i]`, by default i)."""
    from transformers import Emu3ForConditionalGeneration

    model = Emu3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    position_ids = None if positions is None else torch.tensor([positions])
    with torch.no_grad():
        hidden = model.model.text_model(
            input_ids=torch.tensor([token_ids]), position_ids=position_ids
        ).last_hidden_state
        return model.lm_head(hidden)[0]
