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
vocabulary are BPE ids; `BPEToCodebook` turns them into codebook indices.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ChameleonVQVAEConfig

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "BPEToCodebook",
    "ChameleonVQGANDecoder",
    "VQCheckpointError",
    "config_from_yaml",
    "image_token_code",
    "read_decoder_state_dict",
]

# taming's Normalize(): the group count is fixed, so every normed width must be
# a multiple of it.
NORM_GROUPS = 32
NORM_EPS = 1e-6

# The state-dict entries the decode path reads; the encoder, quant_conv and the
# training loss (discriminator, LPIPS) in a full checkpoint are dropped.
DECODER_KEY_PREFIXES = ("quantize.embedding.", "post_quant_conv.", "decoder.")


class VQCheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the decoder; the message says why."""


# --------------------------------------------------------------------------
# Building blocks (names match taming's, so checkpoint keys line up)
# --------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class _ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus a residual (1x1 projected when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
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


class _AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, all C channels wide."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
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


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, attention: bool) -> None:
        super().__init__()
        self.block_1 = _ResnetBlock(channels, channels, dropout)
        # taming's make_attn(): "none" is an Identity, which has no weights.
        self.attn_1 = _AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = _ResnetBlock(channels, channels, dropout)

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
            _ResnetBlock(in_channels if j == 0 else out_channels, out_channels, dropout)
            for j in range(num_blocks)
        )
        self.attn = nn.ModuleList(
            _AttnBlock(out_channels) for _ in range(num_blocks if attention else 0)
        )
        # Registered only where taming has one, so the key set matches.
        if upsample:
            self.upsample = _Upsample(out_channels)

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

        self.norm_out = _group_norm(block_in)
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


def _listing(items: Sequence[str], limit: int = 8) -> str:
    """The first few items, comma-separated, with a count when cut short."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


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
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        problems = []
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                problems.append(f"{title}: {_listing(items)}")
        if problems:
            raise VQCheckpointError(
                f"{path} does not fit this decoder (does its vqgan.yaml match the "
                "checkpoint?) -- " + "; ".join(problems)
            )
        self.load_state_dict(state, strict=True)
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

    @staticmethod
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

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(indices)
        if indices.dim() != 3:
            raise ValueError(
                f"expected codebook indices [B, h, w], got shape {tuple(indices.shape)}"
            )
        if not _is_integer(indices):
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
# Config and checkpoint files
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
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise VQCheckpointError(
                f"{path}: refused -- it holds pickled objects other than tensors, which "
                "weights_only loading does not execute. If the file is trusted, save its "
                "'state_dict' to .safetensors and load that."
            ) from err
        if not isinstance(loaded, Mapping):
            raise VQCheckpointError(
                f"{path}: expected a dict of tensors, got {type(loaded).__name__}"
            )
        state = loaded.get("state_dict", loaded)
        if not isinstance(state, Mapping):
            raise VQCheckpointError(
                f"{path}: 'state_dict' is a {type(state).__name__}, not a mapping"
            )

    kept = {
        k: v for k, v in state.items() if isinstance(k, str) and k.startswith(DECODER_KEY_PREFIXES)
    }
    if not kept:
        sample = ", ".join(sorted(map(str, state))[:8])
        raise VQCheckpointError(
            f"{path}: no decoder weights (keys starting with {', '.join(DECODER_KEY_PREFIXES)}); "
            f"its keys begin: {sample or '(none)'}"
        )
    not_tensors = sorted(k for k, v in kept.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise VQCheckpointError(f"{path}: entries that are not tensors: {_listing(not_tensors)}")
    return kept


# --------------------------------------------------------------------------
# BPE ids -> codebook indices
# --------------------------------------------------------------------------

IMAGE_TOKEN_PREFIX = "IMGIMG"
# Chameleon writes the code's decimal digits as letters, A=0 .. J=9.
_LETTERS_TO_DIGITS = str.maketrans("ABCDEFGHIJ", "0123456789")


def image_token_code(name: str) -> int:
    """The codebook index an image token's name encodes.

    The name is "IMGIMG", the index in decimal with each digit written as a
    letter (A=0 .. J=9), then one closing character, which is dropped: the
    rule of Chameleon's VocabTranslation.bpe2img and transformers'
    ChameleonImageVocabularyMapping.bpe2img ("IMGIMGBCZ" -> 12).
    """
    if not name.startswith(IMAGE_TOKEN_PREFIX):
        raise ValueError(f"{name!r} is not an image token (no {IMAGE_TOKEN_PREFIX!r} prefix)")
    digits = name[len(IMAGE_TOKEN_PREFIX) : -1].translate(_LETTERS_TO_DIGITS)
    if not digits or not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"image token {name!r} does not spell a number in letters A-J")
    return int(digits)


class BPEToCodebook:
    """Maps the language model's image-token ids to VQGAN codebook indices.

    Lumina-mGPT's vocabulary, for one, holds 8192 image tokens at BPE ids
    4..8195; which code each id stands for is read from its name.
    """

    def __init__(self, bpe_ids: Sequence[int], codes: Sequence[int]) -> None:
        bpe = torch.as_tensor(list(bpe_ids), dtype=torch.long)
        code = torch.as_tensor(list(codes), dtype=torch.long)
        if bpe.numel() == 0 or bpe.shape != code.shape:
            raise ValueError("need one codebook index per image-token id, and at least one")
        if int(bpe.min()) < 0 or int(code.min()) < 0:
            raise ValueError("BPE ids and codebook indices must be non-negative")
        if bpe.unique().numel() != bpe.numel():
            raise ValueError("an image-token id appears twice")
        if code.unique().numel() != code.numel():
            raise ValueError("two image tokens name the same codebook index")
        # Dense table over 0..max id; -1 marks ids that are not image tokens.
        self._lookup = torch.full((int(bpe.max()) + 1,), -1, dtype=torch.long)
        self._lookup[bpe] = code
        self._inverse = torch.full((int(code.max()) + 1,), -1, dtype=torch.long)
        self._inverse[code] = bpe
        self._per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_vocab(
        cls, vocab: Mapping[str, int], num_embeddings: int | None = None
    ) -> BPEToCodebook:
        """From a token-name -> id vocabulary (tokenizer.json's model.vocab, or
        `tokenizer.get_vocab()`). With `num_embeddings`, the image tokens must
        name every code 0..num_embeddings-1 exactly once."""
        return cls.from_token_names(
            vocab, IMAGE_TOKEN_PREFIX, image_token_code, num_embeddings, kind="image"
        )

    @classmethod
    def from_token_names(
        cls,
        vocab: Mapping[str, int],
        prefix: str,
        code_of: Callable[[str], int],
        num_codes: int | None = None,
        *,
        kind: str,
    ) -> BPEToCodebook:
        """The table for every token whose name starts with `prefix`, its code
        read by `code_of(name)`. With `num_codes`, the tokens must name every
        code 0..num_codes-1 exactly once (a vocabulary paired with the wrong VQ
        model fails here)."""
        pairs = sorted(
            (int(token_id), code_of(name))
            for name, token_id in vocab.items()
            if name.startswith(prefix)
        )
        if not pairs:
            raise ValueError(f"the vocabulary has no {kind} tokens (names starting {prefix!r})")
        if num_codes is not None:
            found = sorted(p[1] for p in pairs)
            if found != list(range(num_codes)):
                raise ValueError(
                    f"the vocabulary's {len(pairs)} {kind} tokens name codes "
                    f"{found[0]}..{found[-1]}, not each of 0..{num_codes - 1} once "
                    "(wrong pairing of vocabulary and VQ model?)"
                )
        return cls([p[0] for p in pairs], [p[1] for p in pairs])

    @property
    def image_token_ids(self) -> torch.Tensor:
        """Sorted BPE ids of the image tokens, [N] int64."""
        return (self._lookup >= 0).nonzero().squeeze(1)

    @property
    def num_codes(self) -> int:
        return int((self._lookup >= 0).sum())

    def __call__(self, bpe_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Codebook indices for image-token ids, same shape, int64, same device.

        Raises ValueError if any id is not an image token (text, special or
        Lumina-mGPT's end-of-line tokens must be removed first)."""
        return self._translate(bpe_ids, forward=True)

    def to_bpe(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The inverse: image-token ids for codebook indices."""
        return self._translate(codes, forward=False)

    def _translate(self, values: torch.Tensor | Sequence[int], forward: bool) -> torch.Tensor:
        values = torch.as_tensor(values)
        if not _is_integer(values):
            raise TypeError(f"expected integer ids, got {values.dtype}")
        values = values.long()
        table = self._tables(values.device)[0 if forward else 1]
        # Out-of-table ids look up a -1 through the clamp, then fail below.
        inside = (values >= 0) & (values < table.numel())
        out = torch.where(inside, table[values.clamp(0, table.numel() - 1)], -1)
        bad = out < 0
        if bool(bad.any()):
            wrong = [str(v) for v in values[bad].unique().tolist()]
            what = "image-token ids" if forward else "codebook indices of this vocabulary"
            raise ValueError(f"{len(wrong)} value(s) are not {what}: {_listing(wrong)}")
        return out

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._per_device:
            self._per_device[device] = (self._lookup.to(device), self._inverse.to(device))
        return self._per_device[device]
