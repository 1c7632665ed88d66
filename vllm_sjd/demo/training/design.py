"""The demo model's fixed design: sizes, vocabulary, configs, token sequences."""

from __future__ import annotations

import numpy as np

from vllm_sjd.demo import scenes as sc
from vllm_sjd.layouts import chameleon as cl

DOWNSAMPLE = 4
GRID = sc.IMAGE_SIZE // DOWNSAMPLE  # 16 codes per side
IMAGE_TOKENS = GRID * (GRID + 1) + 1  # codes, end-of-line per row, end of image
NUM_CODES = 512
EMBED_DIM = 8
VOCAB_SIZE = 8960
FIRST_WORD_ID = 8900
PROMPT_WORDS = ["Generate", "an", "image", "of", f"{sc.IMAGE_SIZE}x{sc.IMAGE_SIZE}", "according",
                "to", "the", "following", "prompt:"]
UNCOND_PROB = 0.1
FULL_SOFTMAX_POSITIONS = 32
DEFAULT_LM_WIDTH = 256  # the shipped model's; the reproduce line names any other
SIZE_TOKEN_IDS = range(cl.SIZE_TOKEN_BASE, FIRST_WORD_ID)


def vq_config():
    from transformers import ChameleonVQVAEConfig

    return ChameleonVQVAEConfig(
        embed_dim=EMBED_DIM, num_embeddings=NUM_CODES, double_latent=False, latent_channels=32,
        resolution=sc.IMAGE_SIZE, in_channels=3, base_channels=32,
        channel_multiplier=[1, 2, 2], num_res_blocks=1, attn_resolutions=[],
        dropout=0.0, attn_type="vanilla",
    )


def lm_config_kwargs(vocab_map: dict[str, int], width: int) -> dict:
    # Heads of 64 channels at every width: the head size the shipped model is served with.
    heads = width // 64
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=6,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        rms_norm_eps=1e-5, vocabulary_map=vocab_map, tie_word_embeddings=False,
        vq_config=vq_config().to_dict(), bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )


# ---- vocabulary -------------------------------------------------------------

def image_token_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def vocabulary() -> dict[str, int]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({image_token_name(c): cl.CODE_LOW + c for c in range(NUM_CODES)})
    vocab.update({"<eoss>": cl.IMAGE_END, "<racm3:break>": cl.IMAGE_START, "<image>": 8711,
                  "<reserved08799>": cl.END_OF_LINE, cl.TURN_SEPARATOR: cl.END_OF_TURN})
    vocab.update({cl.reserved_token_name(i): i for i in SIZE_TOKEN_IDS})
    words = list(dict.fromkeys(PROMPT_WORDS + sc.CAPTION_WORDS))
    vocab.update({w: FIRST_WORD_ID + i for i, w in enumerate(words)})
    assert max(vocab.values()) < VOCAB_SIZE
    return vocab


# ---- sequences ----------------------------------------------------------------

def header_ids() -> list[int]:
    unit = 2 * DOWNSAMPLE
    return [cl.IMAGE_START, cl.SIZE_TOKEN_BASE + sc.IMAGE_SIZE // unit,
            cl.SIZE_TOKEN_BASE + sc.IMAGE_SIZE // unit]


def prompt_text_ids(tokenizer, caption: str) -> list[int]:
    """The templated text prompt (without the image header)."""
    text = cl.PROMPT_TEMPLATE.format(width=sc.IMAGE_SIZE, height=sc.IMAGE_SIZE, prompt=caption)
    ids = tokenizer(text)["input_ids"]
    assert 0 not in ids, f"unknown word in {text!r}"
    return ids


def in_image_token_order(cell_values: np.ndarray, end_of_line, end_of_image) -> np.ndarray:
    """[..., GRID, GRID] per-cell values -> [..., GRID * (GRID + 1) + 1] in the
    image-token order: each row closed by end_of_line, then end_of_image."""
    lead = cell_values.shape[:-2]
    eol = np.full(lead + (GRID, 1), end_of_line, cell_values.dtype)
    rows = np.concatenate([cell_values, eol], axis=-1).reshape(lead + (-1,))
    return np.concatenate([rows, np.full(lead + (1,), end_of_image, rows.dtype)], axis=-1)


def image_ids(codes: np.ndarray) -> list[int]:
    """[16, 16] codes -> rows of ids each closed by end-of-line, then end of image."""
    return in_image_token_order(codes.astype(np.int64) + cl.CODE_LOW, cl.END_OF_LINE,
                                cl.IMAGE_END).tolist()


def build_sequences(tokenizer, captions, codes):
    """Token sequences with the caption's prompt, and without (for guidance)."""
    header = header_ids()
    prompts = {}
    cond, uncond = [], []
    for caption, grid in zip(captions, codes):
        if caption not in prompts:
            prompts[caption] = prompt_text_ids(tokenizer, caption)
        body = header + image_ids(grid)
        cond.append(prompts[caption] + body)
        uncond.append(body)
    return cond, uncond
