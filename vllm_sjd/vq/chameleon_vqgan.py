"""Chameleon's VQGAN decoder: codebook-index grids [B, h, w] to RGB [B, 3, 16h, 16w].

Chameleon, and Lumina-mGPT and Anole which reuse its image tokenizer, encode a
picture with a taming-transformers VQGAN (8192 codes of 256 dims, 16x
downsampling). transformers ports only the encoder (`ChameleonVQVAE`), since
its Chameleon does not generate images, so the decoder lives here.

Compatibility with the released `vqgan.ckpt` is by parameter name: the module
tree below mirrors `VQModel` in facebookresearch/chameleon
(chameleon/inference/vqgan.py; Lumina-mGPT's chameleon_vae_ori/vqgan.py is the
same code), so its Lightning `state_dict` loads as is. The decode path uses

    quantize.embedding.weight                 [num_embeddings, embed_dim]
    post_quant_conv.{weight,bias}             1x1, embed_dim -> latent_channels
    decoder.conv_in                           3x3, latent_channels -> ch * ch_mult[-1]
    decoder.mid.{block_1, attn_1, block_2}
    decoder.up.{i}.block.{j}                  j = 0 .. num_res_blocks (one extra block)
    decoder.up.{i}.attn.{j}                   only at resolutions in attn_resolutions
    decoder.up.{i}.upsample.conv              every level but i = 0
    decoder.norm_out, decoder.conv_out        3x3, ch * ch_mult[0] -> out_ch

where `up[i]` works at ch * ch_mult[i] channels, so up[0] is the full-resolution
level and the forward pass runs i = n-1 .. 0. Resnet blocks hold norm1, conv1,
norm2, conv2 and, where the channel count changes, a 1x1 nin_shortcut;
attention blocks hold norm, q, k, v, proj_out (1x1 convs). Every norm is
GroupNorm(32, eps=1e-6); the nonlinearity is swish; upsampling is nearest x2
then a 3x3 conv.

Hyper-parameters reuse transformers' `ChameleonVQVAEConfig`; `config_from_yaml`
maps the original vqgan.yaml onto it with the renaming transformers' converter
(convert_chameleon_weights_to_hf.py) uses. Image tokens in the language model's
vocabulary are BPE ids; `BPEToCodebook` (bpe_codebook.py) turns them into
codebook indices. The building blocks are vq/blocks.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChameleonVQVAEConfig

from vllm_sjd.checkpoints import keep_prefixed, load_strictly, read_weights
from vllm_sjd.vq.blocks import NORM_GROUPS, AttnBlock, ResnetBlock, Upsample, group_norm, is_integer, to_pil

__all__ = ["ChameleonVQGANDecoder", "config_from_yaml", "read_decoder_state_dict"]

# The state-dict entries the decode path reads; the encoder, quant_conv and the
# training loss (discriminator, LPIPS) in a full checkpoint are dropped.
DECODER_KEY_PREFIXES = ("quantize.embedding.", "post_quant_conv.", "decoder.")


# --------------------------------------------------------------------------
# The decoder's levels (names match taming's, so checkpoint keys line up)
# --------------------------------------------------------------------------


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, attention: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        # taming's make_attn(): "none" is an Identity, which has no weights.
        self.attn_1 = AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _UpLevel(nn.Module):
    """One entry of decoder.up: num_res_blocks + 1 resnet blocks, each optionally
    followed by attention, then (except at full resolution) a 2x upsample."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        dropout: float,
        attention: bool,
        upsample: bool,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, dropout)
            for j in range(num_blocks)
        )
        self.attn = nn.ModuleList(
            AttnBlock(out_channels) for _ in range(num_blocks if attention else 0)
        )
        # Registered only where taming has one, so the key set matches.
        if upsample:
            self.upsample = Upsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class _Decoder(nn.Module):
    """taming's Decoder with temb_ch = 0 (no timestep projections)."""

    def __init__(self, config: ChameleonVQVAEConfig) -> None:
        super().__init__()
        ch = config.base_channels
        mult = list(config.channel_multiplier)
        n = len(mult)
        attn_resolutions = set(config.attn_resolutions or ())
        vanilla = _uses_attention(config)
        dropout = float(config.dropout)

        block_in = ch * mult[-1]
        # taming computes the lowest resolution once and doubles it going up;
        # with integer division that is not always resolution // 2**i, and it
        # decides where attention sits, so follow it exactly.
        curr_res = config.resolution // 2 ** (n - 1)

        self.conv_in = nn.Conv2d(config.latent_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, vanilla)

        levels: list[nn.Module | None] = [None] * n
        for i in reversed(range(n)):  # built lowest resolution first, as run
            block_out = ch * mult[i]
            levels[i] = _UpLevel(
                block_in,
                block_out,
                config.num_res_blocks + 1,
                dropout,
                attention=vanilla and curr_res in attn_resolutions,
                upsample=i != 0,
            )
            block_in = block_out
            if i != 0:
                curr_res *= 2
        # Indexed by level, so up.0 is full resolution (taming prepends).
        self.up = nn.ModuleList(levels)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, _out_channels(config), 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: [B, latent_channels, h, w] -> [B, out_ch, h * 2**(n-1), w * 2**(n-1)]
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Codebook(nn.Module):
    """Holds `embedding` so the key reads quantize.embedding.weight, as in taming."""

    def __init__(self, num_embeddings: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embed_dim)


def _uses_attention(config: ChameleonVQVAEConfig) -> bool:
    return config.attn_type == "vanilla"


def _out_channels(config: ChameleonVQVAEConfig) -> int:
    # ChameleonVQVAEConfig has no output width (its encoder needs none); the
    # yaml's out_ch is kept as an extra attribute, else RGB in = RGB out.
    return int(getattr(config, "out_channels", None) or config.in_channels)


def _check_config(config: ChameleonVQVAEConfig) -> None:
    mult = list(config.channel_multiplier)
    if not mult:
        raise ValueError("channel_multiplier must name at least one level")
    if config.attn_type not in ("vanilla", "none", None):
        raise ValueError(
            f"attn_type {config.attn_type!r} is not supported (taming's Chameleon "
            "VQGAN knows 'vanilla' and 'none')"
        )
    widths = sorted({config.base_channels * m for m in mult})
    bad = [w for w in widths if w % NORM_GROUPS]
    if bad:
        raise ValueError(
            f"decoder widths {bad} (base_channels * channel_multiplier) must be "
            f"multiples of {NORM_GROUPS}: every norm is GroupNorm({NORM_GROUPS})"
        )


# --------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------


class ChameleonVQGANDecoder(nn.Module):
    """Codebook, post_quant_conv and decoder of Chameleon's VQGAN (no encoder)."""

    def __init__(self, config: ChameleonVQVAEConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        self.quantize = _Codebook(config.num_embeddings, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = _Decoder(config)
        self.eval()  # a frozen tokenizer: never train-mode dropout

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side: 2 ** (levels - 1), 16 for Chameleon."""
        return 2 ** (len(self.config.channel_multiplier) - 1)

    @classmethod
    def from_yaml(
        cls, yaml_path: str | Path, checkpoint: str | Path | None = None
    ) -> ChameleonVQGANDecoder:
        """A decoder shaped by vqgan.yaml; weights from `checkpoint` if given,
        else random (for tests)."""
        model = cls(config_from_yaml(yaml_path))
        if checkpoint is not None:
            model.load_checkpoint(checkpoint)
        return model

    def load_checkpoint(self, path: str | Path) -> ChameleonVQGANDecoder:
        """Load the decoder's weights from vqgan.ckpt (or a .safetensors file).

        Every weight must be present with its shape; a checkpoint with decoder
        weights this config does not expect (say attention the yaml did not ask
        for) is refused too, since it means the config does not match.
        """
        state = read_decoder_state_dict(path)
        load_strictly(self, state, path, "does its vqgan.yaml match the checkpoint?")
        return self

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors, [B, h, w] int -> [B, embed_dim, h, w]."""
        indices = self._check_indices(indices)
        # [B, h, w, D] -> channels first, what the convs want.
        return self.quantize.embedding(indices).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Pixels for codebook-index grids: [B, h, w] int -> [B, 3, f*h, f*w]
        float32 in [-1, 1] (f = downsample_factor). Grids need not be square."""
        z = self.post_quant_conv(self.embed(indices))  # [B, latent_channels, h, w]
        pixels = self.decoder(z)  # [B, out_ch, f*h, f*w]
        # The VQGAN was trained on [-1, 1] images; its raw output overshoots.
        # float32 whatever the weights' dtype: callers convert or score pixels.
        return pixels.clamp(-1.0, 1.0).float()

    forward = decode

    to_pil = staticmethod(to_pil)

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(indices)
        if indices.dim() != 3:
            raise ValueError(
                f"expected codebook indices [B, h, w], got shape {tuple(indices.shape)}"
            )
        if not is_integer(indices):
            raise TypeError(f"codebook indices must be integers, got {indices.dtype}")
        if indices.numel() > 0:
            low, high = int(indices.min()), int(indices.max())
            # Checked here: an out-of-range index is a device-side assert on GPU.
            if low < 0 or high >= self.config.num_embeddings:
                raise ValueError(
                    f"codebook indices must lie in [0, {self.config.num_embeddings}), "
                    f"got values in [{low}, {high}] (BPE ids not yet mapped?)"
                )
        return indices.to(device=self.quantize.embedding.weight.device, dtype=torch.long)


# --------------------------------------------------------------------------
# vqgan.yaml and the checkpoint
# --------------------------------------------------------------------------

# vqgan.yaml name -> ChameleonVQVAEConfig field, under model.params and
# model.params.ddconfig. The renaming is transformers' converter's (ch ->
# base_channels, n_embed -> num_embeddings, ...); out_ch becomes the extra
# attribute out_channels, as there.
_PARAMS_FIELDS = {"embed_dim": "embed_dim", "n_embed": "num_embeddings"}
_DDCONFIG_FIELDS = {
    "double_z": "double_latent",
    "z_channels": "latent_channels",
    "resolution": "resolution",
    "in_channels": "in_channels",
    "out_ch": "out_channels",
    "ch": "base_channels",
    "ch_mult": "channel_multiplier",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "dropout": "dropout",
    "attn_type": "attn_type",
}
# Required by taming's Decoder/VQModel (keyword arguments without defaults).
_REQUIRED_PARAMS = ("embed_dim", "n_embed", "ddconfig")
_REQUIRED_DDCONFIG = (
    "z_channels", "resolution", "in_channels", "out_ch", "ch", "num_res_blocks", "attn_resolutions",
)
# taming's defaults for the optional ones.
_DDCONFIG_DEFAULTS = {
    "ch_mult": [1, 2, 4, 8], "dropout": 0.0, "double_z": True, "attn_type": "vanilla",
}
# Decoder switches this port does not implement, with the only value accepted:
# better to refuse a yaml than to decode with a different network.
_DDCONFIG_FIXED = {
    "resamp_with_conv": True, "give_pre_end": False, "tanh_out": False, "use_linear_attn": False,
}


def config_from_yaml(path: str | Path) -> ChameleonVQVAEConfig:
    """ChameleonVQVAEConfig from a taming/Chameleon vqgan.yaml (model.params).

    Training-only entries (lossconfig, ckpt_path, monitor, ...) are ignored.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    params = document.get("model", {}).get("params") if isinstance(document, dict) else None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: no model.params mapping (is this a taming vqgan.yaml?)")
    missing = [k for k in _REQUIRED_PARAMS if k not in params]
    ddconfig = params.get("ddconfig")
    if isinstance(ddconfig, dict):
        missing += [f"ddconfig.{k}" for k in _REQUIRED_DDCONFIG if k not in ddconfig]
    if missing:
        raise ValueError(f"{path}: model.params lacks {', '.join(missing)}")
    if params.get("remap") is not None:
        # VectorQuantizer2's remap renumbers the codes; Chameleon does not use it.
        raise ValueError(f"{path}: quantizer index remapping (model.params.remap) is not supported")

    ddconfig = {**_DDCONFIG_DEFAULTS, **ddconfig}
    for key, value in _DDCONFIG_FIXED.items():
        if key in ddconfig and bool(ddconfig[key]) != value:
            raise ValueError(f"{path}: ddconfig.{key}={ddconfig[key]!r} is not supported")

    fields: dict[str, Any] = {new: params[old] for old, new in _PARAMS_FIELDS.items()}
    fields.update({new: ddconfig[old] for old, new in _DDCONFIG_FIELDS.items()})
    fields["channel_multiplier"] = [int(m) for m in fields["channel_multiplier"]]
    fields["attn_resolutions"] = [int(r) for r in fields["attn_resolutions"] or []]
    fields["double_latent"] = bool(fields["double_latent"])
    fields["dropout"] = float(fields["dropout"])
    return ChameleonVQVAEConfig(**fields)


def read_decoder_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The decode-path weights of a VQGAN checkpoint, on CPU.

    A .ckpt/.pt/.pth is read with torch.load(weights_only=True): tensors and
    plain containers only, so a checkpoint carrying arbitrary pickled objects
    is refused instead of run. A Lightning checkpoint's "state_dict" is used
    when present. A .safetensors file is read directly.
    """
    return keep_prefixed(read_weights(path), DECODER_KEY_PREFIXES, path, "decoder weights")
