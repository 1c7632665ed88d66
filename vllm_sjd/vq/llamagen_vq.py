"""LlamaGen's VQ-16 decoder: code grids [B, h, w] to RGB [B, 3, 16h, 16w] in [-1, 1].

LlamaGen-T2I encodes images with its own VQ model (vq_ds16_t2i.pt; "VQ-16" in
FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py): a codebook
of 16384 entries of 8 dims, looked up L2-normalised (codebook_l2_norm), a 1x1
post_quant_conv to 256 channels, and a taming-style decoder with
ch = 128, ch_mult = (1, 1, 2, 2, 4), three resnet blocks per level, attention
only at the lowest resolution, GroupNorm(32, eps 1e-6), swish, nearest x2
upsampling. No library ships it, so the decode path is written here; its
parameter names follow LlamaGen's module tree, so the checkpoint's "model"
state dict loads as is:

    quantize.embedding.weight                    [codebook_size, embed_dim]
    post_quant_conv.{weight,bias}                1x1, embed_dim -> z_channels
    decoder.conv_in                              3x3, z_channels -> ch * ch_mult[-1]
    decoder.mid.{0,2}                            resnet blocks; decoder.mid.1 attention
    decoder.conv_blocks.{j}.res.{i}              i < num_res_blocks + 1; j = 0 is the lowest resolution
    decoder.conv_blocks.{j}.attn.{i}             j = 0 only
    decoder.conv_blocks.{j}.upsample.conv        every level but the last
    decoder.norm_out, decoder.conv_out           3x3, ch * ch_mult[0] -> 3

(resnet blocks: norm1, conv1, norm2, conv2, nin_shortcut where the width
changes; attention: norm, q, k, v, proj_out.) The building blocks are the ones
of vllm_sjd/vq/blocks.py: the same taming blocks under the same names.
The encoder, quant_conv and training buffers in the checkpoint are ignored.

The checkpoint is read with torch.load(weights_only=True); LlamaGen's training
checkpoints also hold "args" (an argparse.Namespace), the only extra global
allowed. Weights are taken from "model" (as sample_t2i.py does), else "ema",
"module" or "state_dict", else the file's top level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vllm_sjd.checkpoints import keep_prefixed, load_strictly, read_weights
from vllm_sjd.vq.blocks import AttnBlock, ResnetBlock, Upsample, group_norm, is_integer, to_pil

__all__ = ["LlamaGenVQConfig", "LlamaGenVQDecoder", "read_vq_state_dict"]

DECODER_KEY_PREFIXES = ("quantize.embedding.", "post_quant_conv.", "decoder.")
WRAPPER_KEYS = ("model", "ema", "module", "state_dict")


@dataclass(frozen=True)
class LlamaGenVQConfig:
    """VQ-16's decode-path hyper-parameters (LlamaGen's VQ_16 defaults)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    out_channels: int = 3

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class _Level(nn.Module):
    """decoder.conv_blocks.{j}: res.{i} (+ attn.{i}), then upsample."""

    def __init__(self, block_in: int, block_out: int, num_blocks: int, attention: bool, upsample: bool):
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(block_in if i == 0 else block_out, block_out, 0.0) for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(block_out) for _ in range(num_blocks if attention else 0))
        if upsample:
            self.upsample = Upsample(block_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class _Decoder(nn.Module):
    def __init__(self, config: LlamaGenVQConfig):
        super().__init__()
        mult = list(config.ch_mult)
        block_in = config.ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, 0.0), AttnBlock(block_in), ResnetBlock(block_in, block_in, 0.0)]
        )
        levels = []
        for j, level in enumerate(reversed(range(len(mult)))):  # lowest resolution first
            block_out = config.ch * mult[level]
            levels.append(
                _Level(block_in, block_out, config.num_res_blocks + 1,
                       attention=j == 0, upsample=level != 0)
            )
            block_in = block_out
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, z, h, w] -> [B, 3, f*h, f*w]
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Quantize(nn.Module):
    def __init__(self, config: LlamaGenVQConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)


class LlamaGenVQDecoder(nn.Module):
    """Codebook, post_quant_conv and decoder of LlamaGen's VQ model (no encoder)."""

    def __init__(self, config: LlamaGenVQConfig | None = None):
        super().__init__()
        self.config = config or LlamaGenVQConfig()
        widths = sorted({self.config.ch * m for m in self.config.ch_mult})
        if any(w % 32 for w in widths):
            raise ValueError(f"decoder widths {widths} must be multiples of 32 (GroupNorm(32))")
        self.quantize = _Quantize(self.config)
        self.post_quant_conv = nn.Conv2d(self.config.codebook_embed_dim, self.config.z_channels, 1)
        self.decoder = _Decoder(self.config)
        self.eval()

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: LlamaGenVQConfig | None = None
    ) -> LlamaGenVQDecoder:
        """vq_ds16_t2i.pt (or a .safetensors of its state dict) into a decoder of `config`."""
        return cls(config).load_checkpoint(path)

    def load_checkpoint(self, path: str | Path) -> LlamaGenVQDecoder:
        load_strictly(self, read_vq_state_dict(path), path, "right config?")
        return self

    def codebook_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, h, w] codes -> [B, embed_dim, h, w], L2-normalised entries as LlamaGen looks them up."""
        codes = self._check_codes(codes)
        table = self.quantize.embedding.weight
        if self.config.codebook_l2_norm:
            table = F.normalize(table, p=2, dim=-1)
        return table[codes].permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixels for code grids: [B, h, w] int -> [B, 3, 16h, 16w] float32 in [-1, 1]."""
        pixels = self.decoder(self.post_quant_conv(self.codebook_vectors(codes)))
        # Trained on [-1, 1] images (sample_t2i.py saves with value_range (-1, 1)).
        return pixels.clamp(-1.0, 1.0).float()

    forward = decode

    # [B, 3, H, W] in [-1, 1] -> uint8 RGB PIL images, as the other decoders.
    to_pil = staticmethod(to_pil)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        if codes.dim() != 3:
            raise ValueError(f"expected codes [B, h, w], got shape {tuple(codes.shape)}")
        if not is_integer(codes):
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if codes.numel():
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high >= self.codebook_size:
                raise ValueError(
                    f"codes must lie in [0, {self.codebook_size}), got values in [{low}, {high}]"
                )
        return codes.to(device=self.quantize.embedding.weight.device, dtype=torch.long)


def read_vq_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The decode-path weights of a LlamaGen VQ checkpoint, on CPU, without unpickling code."""
    state = read_weights(path, WRAPPER_KEYS)
    return keep_prefixed(state, DECODER_KEY_PREFIXES, path, "VQ decoder weights")
