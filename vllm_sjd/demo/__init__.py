"""The bundled demo model: a small Lumina-mGPT-format text-to-image model.

Trained by scripts/train_demo_model.py on procedurally drawn captioned scenes
(`vllm_sjd.demo.scenes`), shipped in `MODEL_PATH` so that serving it needs no
network:

    from vllm import LLM
    from vllm_sjd.demo import MODEL_PATH, load_decoder, layout

    llm = LLM(model=str(MODEL_PATH), speculative_config={"method": "sjd",
              "num_speculative_tokens": 16})
    grid = layout().grid(64, 64)
    prompt = layout().prompt("a large red circle on the left on a black background", 64, 64)

The checkpoint directory holds config.json (ChameleonXLLMXForConditionalGeneration,
with "sjd_image_layout": 64 px, 4 px per code, so a 16x16 code grid),
model.safetensors (the language model in bf16 and the VQ encoder as
model.vqmodel.*), a word-level tokenizer, vq/decoder.safetensors (the
Chameleon VQGAN decoder's weights, shaped by the config's vq_config) and
train_report.json.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

MODEL_PATH = Path(__file__).resolve().parent / "model"
DECODER_FILE = "vq/decoder.safetensors"  # not top level: vLLM would load it
IMAGE_SIZE = 64


def config(path: Path | str = MODEL_PATH) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def layout(path: Path | str = MODEL_PATH):
    """The checkpoint's image layout (ChameleonImageLayout at 64 px, 4 px per code)."""
    from types import SimpleNamespace

    from vllm_sjd.contract import LAYOUT_CONFIG_FIELD
    from vllm_sjd.families import image_layout_for

    cfg = config(path)
    own = {LAYOUT_CONFIG_FIELD: cfg.get(LAYOUT_CONFIG_FIELD)}
    return image_layout_for(SimpleNamespace(architectures=cfg["architectures"], **own))


def vq_config(path: Path | str = MODEL_PATH):
    from transformers import ChameleonVQVAEConfig

    return ChameleonVQVAEConfig(**config(path)["vq_config"])


@lru_cache(maxsize=4)
def load_decoder(path: Path | str = MODEL_PATH):
    """The demo's VQ decoder (our ChameleonVQGANDecoder), weights from safetensors."""
    from vllm_sjd.vq.chameleon_vqgan import ChameleonVQGANDecoder

    return ChameleonVQGANDecoder(vq_config(path)).load_checkpoint(Path(path) / DECODER_FILE)


def load_encoder(path: Path | str = MODEL_PATH):
    """The demo's VQ encoder: transformers' ChameleonVQVAE with the trained weights
    (model.vqmodel.* of model.safetensors)."""
    import torch
    from safetensors import safe_open
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    model = ChameleonVQVAE(vq_config(path))
    prefix = "model.vqmodel."
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        state = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model.to(torch.float32).eval()


def to_codebook(path: Path | str = MODEL_PATH):
    """Image-token ids -> codebook indices, from the config's vocabulary_map."""
    from vllm_sjd.vq.bpe_codebook import BPEToCodebook

    cfg = config(path)
    return BPEToCodebook.from_vocab(cfg["vocabulary_map"], cfg["vq_config"]["num_embeddings"])


def decode_tokens(tokens, width: int = IMAGE_SIZE, height: int = IMAGE_SIZE,
                  path: Path | str = MODEL_PATH):
    """Generated image tokens (rows with end-of-line, end of image) -> PIL image."""
    from vllm_sjd.image_generation import decode_image

    grid = layout(path).grid(width, height)
    return decode_image(tokens, grid, to_codebook(path), load_decoder(path))
