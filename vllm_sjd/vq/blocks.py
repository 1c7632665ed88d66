"""The taming-transformers building blocks the VQ decoders share.

Chameleon's VQGAN (and so Lumina-mGPT's and Anole's) and LlamaGen's VQ-16 use
the same blocks under the same parameter names, so released checkpoints load
as they are: GroupNorm(32, eps 1e-6), swish, resnet blocks with a 1x1
nin_shortcut where the width changes, single-head attention with q, k, v,
proj_out, nearest x2 upsampling then a 3x3 conv.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

# taming's Normalize(): the group count is fixed, so every normed width must be
# a multiple of it.
NORM_GROUPS = 32
NORM_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus a residual (1x1 projected when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # taming builds ResnetBlock with conv_shortcut=False, hence the 1x1
        # "nin_shortcut" (and never a 3x3 "conv_shortcut").
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W] -> [B, Cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, all C channels wide."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> same
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(conv: nn.Conv2d) -> torch.Tensor:  # [B, 1, H*W, C]: one head
            return conv(y).flatten(2).transpose(1, 2).unsqueeze(1)

        # SDPA's default scale 1/sqrt(C) and softmax over keys are taming's
        # bmm formulation; SDPA just avoids materialising [B, HW, HW] on GPU.
        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] (or [3, H, W]) in [-1, 1] -> B uint8 RGB PIL images."""
    from PIL import Image

    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W] images, got shape {tuple(images.shape)}")
    # [-1, 1] -> [0, 255], truncated like Chameleon's _pil_from_chw_tensor
    # (numpy astype), so pixels match the reference pipelines exactly.
    scaled = (images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0
    hwc = scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()  # [B, H, W, 3]
    return [Image.fromarray(array) for array in hwc]

