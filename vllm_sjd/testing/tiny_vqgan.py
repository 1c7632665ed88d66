"""A tiny random Chameleon VQGAN decoder for the VQ tests."""

import torch
from transformers import ChameleonVQVAEConfig

from vllm_sjd.vq.chameleon_vqgan import ChameleonVQGANDecoder

# Two levels (downsample 2) of 32 and 64 channels (GroupNorm(32) needs
# multiples of 32); attention at the lowest level, resolution 16 // 2 = 8.
TINY = dict(
    embed_dim=8,
    num_embeddings=16,
    latent_channels=8,
    resolution=16,
    in_channels=3,
    base_channels=32,
    channel_multiplier=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[8],
    dropout=0.0,
)


def tiny_decoder(seed: int = 0, **overrides) -> ChameleonVQGANDecoder:
    torch.manual_seed(seed)
    model = ChameleonVQGANDecoder(ChameleonVQVAEConfig(**{**TINY, **overrides}))
    # Random norms too (default GroupNorm affine is 1/0), so that a mix-up of
    # any two weights changes the output; small enough not to saturate.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def random_grid(model: ChameleonVQGANDecoder, *shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.num_embeddings, shape, generator=g)
