"""Emu3's image decoder: visual-token grids [B, h, w] to RGB [B, 3, 8h, 8w].

Emu3-Gen writes an image as h rows of w visual tokens, each row closed by an
end-of-line token ("<|extra_200|>"), then end-of-frame and end-of-image. The
visual tokens are named "<|visual token 000000|>" .. "<|visual token 032767|>"
(BAAI's template "<|visual token {token_id:0>6d}|>"), and the number in the name
is the index into the VQ codebook (32768 codes).

The VQ model is transformers' `Emu3VQVAE` (the BAAI/Emu3-VisionTokenizer
network) used as is, so there is no copy of it here; this module adds only
what generation needs around it:

  * the BPE id -> codebook index table, read from the token names (BAAI's
    pattern; the same numbers as transformers' `Emu3ImageVocabularyMapping.
    img2bpe`, which slices the six digits). That class's `convert_bpe2img` is
    not used: it drops the last column (it expects the end-of-line tokens
    still in place; `ImageGrid.codes` has removed them) and silently maps a
    non-visual id below the last visual one to code 0;
  * a range check on the codes (an out-of-range index is a device-side assert
    on GPU) and the clamp to [-1, 1] that `Emu3VQVAE.decode` leaves out.

`Emu3VQVAE.decode` takes a 3-D [B, h, w] grid as a single frame: it adds a
temporal axis of length 1, decodes temporal_downsample_factor (4) frames
through its causal temporal upsampling and returns the first one, [B, 3, H, W]
(BAAI's Emu3VisionVQModel.decode does the same). The spatial downsampling is
2 ** (len(channel_multiplier) - 1), 8 for Emu3's (1, 2, 2, 4). Pixels are in
the VQ model's training range [-1, 1] (BAAI's image processor normalises with
mean = std = 0.5; Emu3ImageProcessor.postprocess expects -1..1).

`Emu3ImageDecoder` offers the interface `image_generation.decode_image` uses
(`decode` of [B, h, w] codes, `to_pil`), with `codes_from_tokens` as its
`to_codebook`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import Emu3VQVAE

from vllm_sjd.checkpoints import CheckpointError, listing
from vllm_sjd.vq.blocks import to_pil
from vllm_sjd.vq.bpe_codebook import BPEToCodebook

__all__ = ["Emu3ImageDecoder", "VISUAL_TOKEN_PREFIX", "visual_token_code"]

VISUAL_TOKEN_PREFIX = "<|visual token"
# BAAI's Emu3Processor parses names with r"<\|visual token (\d+)\|>"; names are
# written with six digits, the width transformers' img2bpe (token[-8:-2]) assumes.
_VISUAL_TOKEN = re.compile(r"<\|visual token (\d+)\|>")

# The state-dict entries Emu3VQVAE.decode reads; the encoder and quant_conv
# may be missing from a checkpoint without changing a decoded pixel.
_DECODE_KEY_PREFIXES = ("quantize.", "post_quant_conv.", "decoder.")


def visual_token_code(name: str) -> int:
    """The codebook index a visual token's name encodes: "<|visual token 000012|>" -> 12."""
    match = _VISUAL_TOKEN.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not an Emu3 visual token name")
    return int(match.group(1))


class Emu3ImageDecoder:
    """transformers' Emu3VQVAE plus the visual-token -> codebook-index table."""

    def __init__(self, vq_model: Emu3VQVAE, bpe_to_codebook: BPEToCodebook) -> None:
        self.vq_model = vq_model.eval()  # a frozen tokenizer: BatchNorm3d on running stats
        self.bpe_to_codebook = bpe_to_codebook

    @classmethod
    def from_vq_model(
        cls, vq_model: Emu3VQVAE, vocabulary_map: Mapping[str, int]
    ) -> Emu3ImageDecoder:
        """Wrap a loaded Emu3VQVAE. `vocabulary_map` is the tokenizer's name -> id
        vocabulary (`Emu3Config.vocabulary_map`, tokenizer.json's model.vocab or
        `tokenizer.get_vocab()`); its visual tokens must name each code
        0..codebook_size-1 exactly once."""
        table = BPEToCodebook.from_token_names(
            vocabulary_map,
            VISUAL_TOKEN_PREFIX,
            visual_token_code,
            vq_model.config.codebook_size,
            kind="visual",
        )
        return cls(vq_model, table)

    @classmethod
    def from_pretrained(
        cls,
        vq_path: str | Path,
        vocabulary_map: Mapping[str, int],
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> Emu3ImageDecoder:
        """Load Emu3VQVAE from a local folder (config.json of model_type
        "emu3_vqgan" + safetensors, as `Emu3VQVAE.save_pretrained` writes);
        never the hub. Raises CheckpointError if a weight the decoder needs
        is not in the checkpoint (transformers would leave it random)."""
        path = Path(vq_path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder (a local Emu3VQVAE checkpoint)")
        kwargs = {} if dtype is None else {"dtype": dtype}
        vq_model, info = Emu3VQVAE.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True, **kwargs
        )
        missing = sorted(k for k in info["missing_keys"] if k.startswith(_DECODE_KEY_PREFIXES))
        mismatched = sorted(str(k) for k in info["mismatched_keys"])
        if missing or mismatched:
            problems = [f"missing: {listing(missing)}"] if missing else []
            problems += [f"shape mismatch: {listing(mismatched)}"] if mismatched else []
            raise CheckpointError(
                f"{path} does not hold Emu3VQVAE decoder weights that fit its config -- "
                + "; ".join(problems)
            )
        if device is not None:
            vq_model = vq_model.to(device)
        return cls.from_vq_model(vq_model, vocabulary_map)

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side: 2 ** (levels - 1), 8 for Emu3."""
        return int(self.vq_model.spatial_scale_factor)

    @property
    def codebook_size(self) -> int:
        return int(self.vq_model.config.codebook_size)

    def to(self, *args, **kwargs) -> Emu3ImageDecoder:
        """Move or cast the VQ model (torch.nn.Module.to's arguments)."""
        self.vq_model = self.vq_model.to(*args, **kwargs)
        return self

    def codes_from_tokens(self, bpe_ids: torch.Tensor) -> torch.Tensor:
        """Codebook indices for visual-token ids: [h, w] (any shape) int ->
        same shape int64, same device. Raises ValueError listing the ids that
        are not visual tokens (end-of-line and other layout tokens must be
        removed first, as `ImageGrid.codes` does)."""
        try:
            return self.bpe_to_codebook(bpe_ids)
        except ValueError as err:
            raise ValueError(f"Emu3 decoding takes visual-token ids only: {err}") from err

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixels for codebook-index grids: [B, h, w] int -> [B, 3, f*h, f*w]
        float32 in [-1, 1] (f = downsample_factor), on the model's device."""
        codes = self._check_codes(codes)
        # 3-D in: Emu3VQVAE treats it as one frame ([B, 1, h, w]) and returns
        # frame 0 of the temporal_downsample_factor frames it decodes.
        pixels = self.vq_model.decode(codes)  # [B, out_channels, f*h, f*w]
        # Trained on [-1, 1] images; the raw output overshoots. float32 whatever
        # the weights' dtype, as the Chameleon decoder returns.
        return pixels.clamp(-1.0, 1.0).float()

    # [-1, 1] -> uint8 truncated, as Emu3ImageProcessor.postprocess does with
    # mean = std = 0.5 (unnormalize, x 255, clip, astype(uint8)).
    to_pil = staticmethod(to_pil)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        if codes.dim() != 3:
            raise ValueError(
                f"expected codebook indices [B, h, w] (one image each), got shape "
                f"{tuple(codes.shape)}"
            )
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise TypeError(f"codebook indices must be integers, got {codes.dtype}")
        if codes.numel() > 0:
            low, high = int(codes.min()), int(codes.max())
            # Checked here: an out-of-range index is a device-side assert on GPU.
            if low < 0 or high >= self.codebook_size:
                raise ValueError(
                    f"codebook indices must lie in [0, {self.codebook_size}), got values in "
                    f"[{low}, {high}] (BPE ids not yet mapped?)"
                )
        device = self.vq_model.quantize.embedding.weight.device
        return codes.to(device=device, dtype=torch.long)
