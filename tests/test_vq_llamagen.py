"""Engine-free tests of LlamaGen's VQ-16 decoder (vllm_sjd/vq/llamagen_vq.py).

A small random-weight VQ (32/64 channels, 64 codes of 8 dims, five levels so
the real 16x downsampling) for shapes, dtype and range; the real VQ-16 config
for the checkpoint's key names; checkpoints written the way LlamaGen's
trainer writes them ({"model": ..., "optimizer": ..., "args": Namespace}).
"""

import argparse

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vllm_sjd.checkpoints import CheckpointError
from vllm_sjd.vq.llamagen_vq import LlamaGenVQConfig, LlamaGenVQDecoder, read_vq_state_dict

CODES = 64
SMALL = LlamaGenVQConfig(codebook_size=CODES, codebook_embed_dim=8, z_channels=32, ch=32,
                         ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1)


def small_decoder(seed: int = 0) -> LlamaGenVQDecoder:
    torch.manual_seed(seed)
    decoder = LlamaGenVQDecoder(SMALL)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        decoder.decoder.conv_out.weight.mul_(20.0)  # so the clamp has work to do
    return decoder


def random_codes(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CODES, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def decoder() -> LlamaGenVQDecoder:
    return small_decoder()


def test_decode_shape_dtype_and_range(decoder):
    assert decoder.downsample_factor == 16
    codes = random_codes(2, 3, 5)  # non-square on purpose
    pixels = decoder.decode(codes)
    assert pixels.shape == (2, 3, 48, 80) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    with torch.no_grad():
        raw = decoder.decoder(decoder.post_quant_conv(decoder.codebook_vectors(codes)))
    assert raw.abs().max() > 1.0
    torch.testing.assert_close(pixels, raw.clamp(-1, 1), rtol=0, atol=0)
    bf16 = small_decoder().to(torch.bfloat16)
    assert bf16.decode(codes).dtype == torch.float32


def test_codebook_lookup_is_l2_normalised(decoder):
    codes = random_codes(1, 2, 3)
    before = decoder.decode(codes)
    scaled = small_decoder()
    with torch.no_grad():
        scaled.quantize.embedding.weight.mul_(torch.rand(CODES, 1) * 5 + 0.1)
    torch.testing.assert_close(scaled.codebook_vectors(codes), decoder.codebook_vectors(codes))
    torch.testing.assert_close(scaled.decode(codes), before, rtol=0, atol=1e-3)
    vectors = decoder.codebook_vectors(codes)
    assert vectors.shape == (1, 8, 2, 3)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(1, 2, 3))


def test_images_decode_independently_and_codes_matter(decoder):
    codes = random_codes(3, 2, 2)
    together = decoder.decode(codes)
    singles = torch.cat([decoder.decode(codes[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(singles, together, rtol=0, atol=1e-3)  # batched convs round differently
    assert not torch.allclose(together[0], decoder.decode((codes[:1] + 1) % CODES)[0])


def test_bad_codes_are_refused(decoder):
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        decoder.decode(random_codes(3, 5))
    with pytest.raises(TypeError, match="integers"):
        decoder.decode(random_codes(1, 2, 2).float())
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        decoder.decode(torch.full((1, 2, 2), CODES))


def vq16_decoder_keys(config: LlamaGenVQConfig) -> set[str]:
    """The decode-path keys of LlamaGen's VQModel state dict, spelled out from its
    module tree (Decoder: conv_in, mid[resnet, attn, resnet], conv_blocks from the
    lowest resolution up, norm_out, conv_out)."""
    resnet = ("norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias",
              "norm2.weight", "norm2.bias", "conv2.weight", "conv2.bias")
    attn = ("norm.weight", "norm.bias", "q.weight", "q.bias", "k.weight", "k.bias",
            "v.weight", "v.bias", "proj_out.weight", "proj_out.bias")
    keys = {"quantize.embedding.weight", "post_quant_conv.weight", "post_quant_conv.bias",
            "decoder.conv_in.weight", "decoder.conv_in.bias", "decoder.norm_out.weight",
            "decoder.norm_out.bias", "decoder.conv_out.weight", "decoder.conv_out.bias"}
    keys |= {f"decoder.mid.{i}.{k}" for i in (0, 2) for k in resnet}
    keys |= {f"decoder.mid.1.{k}" for k in attn}
    mult = list(config.ch_mult)
    block_in = config.ch * mult[-1]
    for j, level in enumerate(reversed(range(len(mult)))):
        block_out = config.ch * mult[level]
        for i in range(config.num_res_blocks + 1):
            keys |= {f"decoder.conv_blocks.{j}.res.{i}.{k}" for k in resnet}
            if (block_in if i == 0 else block_out) != block_out:
                keys |= {f"decoder.conv_blocks.{j}.res.{i}.nin_shortcut.{k}" for k in ("weight", "bias")}
            if j == 0:
                keys |= {f"decoder.conv_blocks.{j}.attn.{i}.{k}" for k in attn}
        if level != 0:
            keys |= {f"decoder.conv_blocks.{j}.upsample.conv.{k}" for k in ("weight", "bias")}
        block_in = block_out
    return keys


def test_real_vq16_has_llamagens_key_names():
    config = LlamaGenVQConfig()
    assert (config.codebook_size, config.codebook_embed_dim, config.downsample_factor) == (16384, 8, 16)
    real = LlamaGenVQDecoder(config)
    state = real.state_dict()
    assert set(state) == vq16_decoder_keys(config)
    assert state["decoder.conv_in.weight"].shape == (512, 256, 3, 3)
    assert state["decoder.conv_blocks.1.res.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert state["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in state
    assert real.decode(torch.zeros(1, 1, 2, dtype=torch.long)).shape == (1, 3, 16, 32)


def training_checkpoint(decoder: LlamaGenVQDecoder) -> dict:
    """As LlamaGen's vq_train.py saves it: the full VQModel (encoder too) under "model"."""
    model = dict(decoder.state_dict())
    model["encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)
    model["quant_conv.weight"] = torch.randn(8, 32, 1, 1)
    model["quantize.codebook_used"] = torch.zeros(65536)
    return {"model": model, "optimizer": {"state": {}}, "steps": 10,
            "args": argparse.Namespace(vq_model="VQ-16", codebook_size=CODES)}


def test_checkpoint_round_trip(decoder, tmp_path):
    torch.save(training_checkpoint(decoder), tmp_path / "vq_ds16_t2i.pt")
    loaded = LlamaGenVQDecoder.from_checkpoint(tmp_path / "vq_ds16_t2i.pt", SMALL)
    codes = random_codes(1, 3, 2, seed=5)
    torch.testing.assert_close(loaded.decode(codes), decoder.decode(codes), rtol=0, atol=0)
    save_file(dict(decoder.state_dict()), str(tmp_path / "vq.safetensors"))
    again = LlamaGenVQDecoder.from_checkpoint(tmp_path / "vq.safetensors", SMALL)
    torch.testing.assert_close(again.decode(codes), decoder.decode(codes), rtol=0, atol=0)


class _Payload:
    pass


def test_checkpoint_problems_are_named(decoder, tmp_path):
    bad = training_checkpoint(decoder)
    bad["hook"] = _Payload()
    torch.save(bad, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="refused"):
        read_vq_state_dict(tmp_path / "pickled.pt")
    short = training_checkpoint(decoder)
    del short["model"]["decoder.conv_out.bias"]
    torch.save(short, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="missing: decoder.conv_out.bias"):
        LlamaGenVQDecoder.from_checkpoint(tmp_path / "short.pt", SMALL)
    torch.save(training_checkpoint(decoder), tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        LlamaGenVQDecoder.from_checkpoint(tmp_path / "small.pt")  # the real VQ-16 config
    torch.save({"model": {"layers.0.weight": torch.ones(1)}}, tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match="no VQ decoder weights"):
        read_vq_state_dict(tmp_path / "gpt.pt")


def test_to_pil_and_decode_image_with_a_llamagen_grid(decoder):
    from vllm_sjd.image_generation import decode_image
    from vllm_sjd.layouts.llamagen import LlamaGenImageLayout

    images = decoder.to_pil(decoder.decode(random_codes(2, 2, 3)))
    assert [im.size for im in images] == [(48, 32)] * 2 and images[0].mode == "RGB"
    layout = LlamaGenImageLayout(image_size=64, codebook_size=CODES)
    grid = layout.grid(64, 64)
    codes = random_codes(4, 4, seed=9)
    image = decode_image(codes.flatten().tolist(), grid, lambda c: c, decoder)
    assert image.size == (64, 64)
    expected = decoder.to_pil(decoder.decode(codes[None]))[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
