"""Engine-free tests of the Chameleon VQGAN decoder's network (vllm_sjd/vq/chameleon_vqgan.py).

Tiny random-weight decoders on CPU. The layout the decoder must match is
taming's VQModel as used by Chameleon (chameleon/inference/vqgan.py) and
Lumina-mGPT; checkpoint and yaml reading are in test_vq_chameleon_files.py.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import ChameleonVQVAEConfig

from vllm_sjd.testing.tiny_vqgan import TINY, random_grid, tiny_decoder
from vllm_sjd.vq.chameleon_vqgan import ChameleonVQGANDecoder

# --------------------------------------------------------------------------
# Layout and numerics
# --------------------------------------------------------------------------


def test_tiny_key_layout_is_tamings():
    shapes = {k: tuple(v.shape) for k, v in tiny_decoder().state_dict().items()}

    def resnet(prefix, cin, cout):
        keys = {
            f"{prefix}.norm1.weight": (cin,),
            f"{prefix}.norm1.bias": (cin,),
            f"{prefix}.conv1.weight": (cout, cin, 3, 3),
            f"{prefix}.conv1.bias": (cout,),
            f"{prefix}.norm2.weight": (cout,),
            f"{prefix}.norm2.bias": (cout,),
            f"{prefix}.conv2.weight": (cout, cout, 3, 3),
            f"{prefix}.conv2.bias": (cout,),
        }
        if cin != cout:
            keys[f"{prefix}.nin_shortcut.weight"] = (cout, cin, 1, 1)
            keys[f"{prefix}.nin_shortcut.bias"] = (cout,)
        return keys

    def attn(prefix, c):
        keys = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)}
        for name in ("q", "k", "v", "proj_out"):
            keys[f"{prefix}.{name}.weight"] = (c, c, 1, 1)
            keys[f"{prefix}.{name}.bias"] = (c,)
        return keys

    expected = {
        "quantize.embedding.weight": (16, 8),
        "post_quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.bias": (8,),
        "decoder.conv_in.weight": (64, 8, 3, 3),
        "decoder.conv_in.bias": (64,),
        **resnet("decoder.mid.block_1", 64, 64),
        **attn("decoder.mid.attn_1", 64),
        **resnet("decoder.mid.block_2", 64, 64),
        # up.1: the lowest resolution (8), 64 channels, runs first: its
        # num_res_blocks + 1 = 2 blocks each get attention, then upsampling.
        **resnet("decoder.up.1.block.0", 64, 64),
        **resnet("decoder.up.1.block.1", 64, 64),
        **attn("decoder.up.1.attn.0", 64),
        **attn("decoder.up.1.attn.1", 64),
        "decoder.up.1.upsample.conv.weight": (64, 64, 3, 3),
        "decoder.up.1.upsample.conv.bias": (64,),
        # up.0: full resolution (16), 32 channels, no attention, no upsample.
        **resnet("decoder.up.0.block.0", 64, 32),
        **resnet("decoder.up.0.block.1", 32, 32),
        "decoder.norm_out.weight": (32,),
        "decoder.norm_out.bias": (32,),
        "decoder.conv_out.weight": (3, 32, 3, 3),
        "decoder.conv_out.bias": (3,),
    }
    assert shapes == expected


def reference_decode(sd: dict, config: ChameleonVQVAEConfig, indices: torch.Tensor) -> torch.Tensor:
    """taming's VQModel.decode(get_codebook_entry(...)), written out in plain
    functional torch over the state dict (bmm attention, x * sigmoid(x))."""

    def norm(x, p):
        return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)

    def conv(x, p, padding):
        return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=padding)

    def swish(x):
        return x * torch.sigmoid(x)

    def resnet(x, p):
        h = conv(swish(norm(x, f"{p}.norm1")), f"{p}.conv1", 1)
        h = conv(swish(norm(h, f"{p}.norm2")), f"{p}.conv2", 1)
        if f"{p}.nin_shortcut.weight" in sd:
            x = conv(x, f"{p}.nin_shortcut", 0)
        return x + h

    def attn(x, p):
        b, c, hh, ww = x.shape
        y = norm(x, f"{p}.norm")
        q = conv(y, f"{p}.q", 0).reshape(b, c, -1).permute(0, 2, 1)  # b, hw, c
        k = conv(y, f"{p}.k", 0).reshape(b, c, -1)  # b, c, hw
        w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # b, hw(q), hw(k)
        v = conv(y, f"{p}.v", 0).reshape(b, c, -1)
        h = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + conv(h, f"{p}.proj_out", 0)

    z = sd["quantize.embedding.weight"][indices].permute(0, 3, 1, 2)
    h = conv(conv(z, "post_quant_conv", 0), "decoder.conv_in", 1)
    h = resnet(h, "decoder.mid.block_1")
    h = attn(h, "decoder.mid.attn_1")
    h = resnet(h, "decoder.mid.block_2")
    for i in reversed(range(len(config.channel_multiplier))):
        for j in range(config.num_res_blocks + 1):
            h = resnet(h, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = attn(h, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = conv(h, f"decoder.up.{i}.upsample.conv", 1)
    return conv(swish(norm(h, "decoder.norm_out")), "decoder.conv_out", 1)


@pytest.mark.parametrize("shape", [(1, 2, 2), (2, 3, 5), (3, 4, 4)])
def test_decode_shapes_dtype_range_and_determinism(shape):
    model = tiny_decoder()
    assert model.downsample_factor == 2
    grid = random_grid(model, *shape)
    out = model.decode(grid)
    b, h, w = shape
    assert out.shape == (b, 3, 2 * h, 2 * w)
    assert out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert torch.equal(out, model.decode(grid))
    assert torch.equal(out, tiny_decoder().decode(grid))  # same seed, same weights
    # Each image decodes independently of its batch neighbours.
    assert torch.allclose(out[-1:], model.decode(grid[-1:]), atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"num_res_blocks": 2, "attn_resolutions": [8, 16]}])
def test_decode_matches_functional_reference(overrides):
    model = tiny_decoder(**overrides)
    grid = random_grid(model, 2, 3, 4)
    expected = reference_decode(model.state_dict(), model.config, grid)
    # Check the clamp is not hiding everything: the raw output is mostly inside.
    assert (expected.abs() < 1).float().mean() > 0.5
    assert torch.allclose(model.decode(grid), expected.clamp(-1, 1), atol=1e-5)


def test_no_attention_when_attn_type_none():
    model = tiny_decoder(attn_type="none")
    assert not any(".attn" in k for k in model.state_dict())
    assert model.decode(random_grid(model, 1, 2, 2)).shape == (1, 3, 4, 4)


def test_config_checks():
    with pytest.raises(ValueError, match="multiples of 32"):
        ChameleonVQGANDecoder(ChameleonVQVAEConfig(**{**TINY, "base_channels": 48}))
    with pytest.raises(ValueError, match="attn_type"):
        ChameleonVQGANDecoder(ChameleonVQVAEConfig(**{**TINY, "attn_type": "linear"}))


def test_decode_rejects_bad_indices():
    model = tiny_decoder()
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode(torch.tensor([[[0, 16]]]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode(torch.tensor([[[-1, 0]]]))
    with pytest.raises(TypeError):
        model.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        model.decode(torch.zeros(2, 2, dtype=torch.long))


def test_to_pil():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(2, 3, 1, 4)
    pils = ChameleonVQGANDecoder.to_pil(images)
    assert len(pils) == 2
    assert pils[0].mode == "RGB" and pils[0].size == (4, 1)  # PIL size is (W, H)
    # Truncated like Chameleon's _pil_from_chw_tensor: 0 -> 127.5 -> 127; 2 clamps to 255.
    row = [pils[1].getpixel((x, 0)) for x in range(4)]
    assert row == [(0, 0, 0), (127, 127, 127), (255, 255, 255), (255, 255, 255)]

    model = tiny_decoder()
    (single,) = model.to_pil(model.decode(random_grid(model, 1, 3, 5))[0])
    assert single.size == (10, 6)
