"""Janus-Pro's image decoder: transformers' JanusVQVAE, read from the checkpoint itself.

A Janus checkpoint in transformers' format holds its VQ model beside the
language model (model.vqmodel.*, shaped by the config's vq_config), so the
decoder needs no folder of its own. Codes come from image token ids by
subtracting the text vocabulary (vllm_sjd/models/janus.py); pixels are in
[-1, 1] (Janus's image processor normalises with mean = std = 0.5).
"""

from pathlib import Path

import torch

from vllm_sjd.checkpoints import CheckpointError, listing
from vllm_sjd.vq.blocks import to_pil

PREFIX = "model.vqmodel."
# What JanusVQVAE.decode reads; the encoder and quant_conv may be absent.
_DECODE_KEYS = ("quantize.", "post_quant_conv.", "decoder.")


class JanusImageDecoder:
    """`decode` of [B, h, w] codes and `to_pil`, the interface decode_image uses."""

    def __init__(self, vq_model, text_vocab_size: int) -> None:
        self.vq_model = vq_model.eval()
        self.text_vocab_size = text_vocab_size

    @classmethod
    def from_checkpoint(cls, folder: str | Path, hf_config) -> "JanusImageDecoder":
        from safetensors import safe_open
        from transformers import JanusVQVAE

        from vllm_sjd.models.janus_config import text_vocab_size

        files = sorted(Path(folder).glob("*.safetensors"))
        state = {}
        for file in files:
            with safe_open(str(file), "pt") as f:
                state.update({k[len(PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)})
        vq_model = JanusVQVAE(hf_config.vq_config)
        missing = [k for k in vq_model.state_dict() if k.startswith(_DECODE_KEYS) and k not in state]
        if not files or missing:
            raise CheckpointError(
                f"{folder} holds no Janus VQ decoder ({PREFIX}* in its safetensors)"
                + (f"; missing: {listing(missing)}" if files else ""))
        vq_model.load_state_dict(state, strict=False)
        return cls(vq_model, text_vocab_size(hf_config.text_config))

    def codes_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = tokens - self.text_vocab_size
        num_codes = self.vq_model.config.num_embeddings
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
            raise ValueError(f"image token ids outside the {num_codes} codes after the text vocabulary")
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, h, w] codes -> [B, 3, 16h, 16w] pixels in [-1, 1]."""
        return self.vq_model.decode(codes.flatten(1)).clamp(-1.0, 1.0)

    def to_pil(self, pixels: torch.Tensor):
        return to_pil(pixels)
