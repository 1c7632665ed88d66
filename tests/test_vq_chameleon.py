"""Engine-free tests of the Chameleon VQGAN decoder (vllm_sjd/vq/chameleon_vqgan.py).

Tiny random-weight decoders on CPU; the full-size default config is built on
the meta device only. The layout the decoder must match is taming's VQModel as
used by Chameleon (chameleon/inference/vqgan.py) and Lumina-mGPT.
"""

import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import ChameleonVQVAEConfig

from vllm_sjd.vq.chameleon_vqgan import (
    BPEToCodebook,
    ChameleonVQGANDecoder,
    VQCheckpointError,
    config_from_yaml,
    image_token_code,
    read_decoder_state_dict,
)

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

TINY_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 8
    n_embed: 16
    ckpt_path: /nowhere/vqgan.ckpt
    ddconfig:
      double_z: false
      z_channels: 8
      resolution: 16
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2]
      num_res_blocks: 1
      attn_resolutions: [8]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_start: 0
"""

# The shape of Chameleon's tokenizer/vqgan.yaml: 8192 codes of 256 dims,
# 512 px, five levels (16x), no attention outside the middle block.
CHAMELEON_LIKE_YAML = """\
model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 8192
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 512
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
"""


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


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def lightning_checkpoint(model: ChameleonVQGANDecoder) -> dict:
    """What a taming training run saves: the whole VQModel and its loss."""
    state = dict(model.state_dict())
    state["encoder.conv_in.weight"] = torch.zeros(32, 3, 3, 3)
    state["quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    return {"epoch": 3, "global_step": 190000, "state_dict": state}


def test_checkpoint_round_trip(tmp_path):
    source = tiny_decoder(seed=0)
    path = tmp_path / "vqgan.ckpt"
    torch.save(lightning_checkpoint(source), path)

    kept = read_decoder_state_dict(path)
    assert set(kept) == set(source.state_dict())  # encoder, quant_conv, loss dropped

    target = tiny_decoder(seed=123)
    grid = random_grid(source, 2, 3, 3)
    assert not torch.equal(target.decode(grid), source.decode(grid))
    assert target.load_checkpoint(path) is target
    assert torch.equal(target.decode(grid), source.decode(grid))


def test_bare_state_dict_and_safetensors(tmp_path):
    source = tiny_decoder(seed=0)
    grid = random_grid(source, 1, 2, 3)
    bare = tmp_path / "bare.pt"
    torch.save(source.state_dict(), bare)
    st = tmp_path / "vqgan.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st))
    for path in (bare, st):
        loaded = tiny_decoder(seed=7).load_checkpoint(path)
        assert torch.equal(loaded.decode(grid), source.decode(grid))


def test_checkpoint_mismatches_are_reported(tmp_path):
    source = tiny_decoder()
    path = tmp_path / "vqgan.ckpt"

    state = dict(source.state_dict())
    del state["decoder.up.1.attn.0.q.weight"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(VQCheckpointError, match=r"missing: decoder\.up\.1\.attn\.0\.q\.weight"):
        tiny_decoder().load_checkpoint(path)

    # Weights for attention this config lacks: the yaml and the checkpoint disagree.
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.raises(VQCheckpointError, match=r"unexpected: decoder\.up\.1\.attn\.0\.k\.bias"):
        tiny_decoder(attn_resolutions=[]).load_checkpoint(path)

    with pytest.raises(VQCheckpointError, match=r"shape mismatch: quantize\.embedding\.weight"):
        tiny_decoder(num_embeddings=32).load_checkpoint(path)

    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, path)
    with pytest.raises(VQCheckpointError, match="no decoder weights"):
        read_decoder_state_dict(path)


UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return "payload"


class _Payload:
    """Runs _record_unpickling() when unpickled, as a hostile file would run anything."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    UNPICKLED.clear()
    path = tmp_path / "vqgan.ckpt"
    checkpoint = lightning_checkpoint(tiny_decoder())
    checkpoint["hyper_parameters"] = _Payload()
    torch.save(checkpoint, path)

    with pytest.raises(VQCheckpointError, match="refused") as info:
        tiny_decoder().load_checkpoint(path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert UNPICKLED == []  # nothing ran

    # The payload does run under a plain unpickle: the test file is live.
    torch.load(path, weights_only=False)
    assert UNPICKLED == [True]


# --------------------------------------------------------------------------
# vqgan.yaml
# --------------------------------------------------------------------------


def test_yaml_round_trip(tmp_path):
    yaml_path = tmp_path / "vqgan.yaml"
    yaml_path.write_text(TINY_YAML)
    config = config_from_yaml(yaml_path)
    assert isinstance(config, ChameleonVQVAEConfig)
    for key, value in TINY.items():
        assert getattr(config, key) == value, key
    assert config.out_channels == 3 and config.double_latent is False

    source = tiny_decoder()
    ckpt = tmp_path / "vqgan.ckpt"
    torch.save(lightning_checkpoint(source), ckpt)
    loaded = ChameleonVQGANDecoder.from_yaml(yaml_path, ckpt)
    grid = random_grid(source, 1, 3, 2)
    assert torch.equal(loaded.decode(grid), source.decode(grid))
    random_weights = ChameleonVQGANDecoder.from_yaml(yaml_path)
    assert random_weights.state_dict().keys() == source.state_dict().keys()


@pytest.mark.parametrize(
    "edit, message",
    [
        (("    n_embed: 16\n", ""), "n_embed"),
        (("      ch: 32\n", ""), "ddconfig.ch"),
        (("    embed_dim: 8\n", "    embed_dim: 8\n    remap: used.npy\n"), "remap"),
        (("      dropout: 0.0\n", "      dropout: 0.0\n      tanh_out: true\n"), "tanh_out"),
        (("model:\n", "other:\n"), "model.params"),
    ],
)
def test_yaml_errors(tmp_path, edit, message):
    path = tmp_path / "vqgan.yaml"
    assert TINY_YAML.count(edit[0]) == 1
    path.write_text(TINY_YAML.replace(*edit))
    with pytest.raises(ValueError, match=message):
        config_from_yaml(path)


def test_chameleon_yaml_matches_transformers_defaults(tmp_path):
    path = tmp_path / "vqgan.yaml"
    path.write_text(CHAMELEON_LIKE_YAML)
    ours, default = config_from_yaml(path), ChameleonVQVAEConfig()
    for key in (
        "embed_dim", "num_embeddings", "double_latent", "latent_channels", "resolution",
        "in_channels", "base_channels", "num_res_blocks", "dropout", "attn_type",
    ):
        assert getattr(ours, key) == getattr(default, key), key
    assert list(ours.channel_multiplier) == list(default.channel_multiplier)
    assert not ours.attn_resolutions and not default.attn_resolutions


def test_default_config_decoder_on_meta():
    """The full-size decoder from transformers' defaults, shapes only."""
    config = ChameleonVQVAEConfig()
    with torch.device("meta"):
        model = ChameleonVQGANDecoder(config)
    assert model.quantize.embedding.weight.shape == (8192, 256)
    assert model.downsample_factor == 16
    assert config.resolution // model.downsample_factor == 32  # 32 x 32 = 1024 tokens
    assert model.post_quant_conv.weight.shape == (256, 256, 1, 1)
    assert model.decoder.conv_in.weight.shape == (512, 256, 3, 3)  # 128 * 4
    assert model.decoder.conv_out.weight.shape == (3, 128, 3, 3)
    assert len(model.decoder.up) == 5
    for i, level in enumerate(model.decoder.up):
        assert len(level.block) == 3 and len(level.attn) == 0
        assert hasattr(level, "upsample") == (i != 0)
        assert level.block[-1].conv2.weight.shape[0] == 128 * config.channel_multiplier[i]
    assert model.decoder.mid.attn_1.q.weight.shape == (512, 512, 1, 1)

    # transformers' encoder-side VQVAE holds the same codebook and
    # post_quant_conv under the same names.
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    with torch.device("meta"):
        encoder_side = ChameleonVQVAE(config).state_dict()
    for key in ("quantize.embedding.weight", "post_quant_conv.weight", "post_quant_conv.bias"):
        assert encoder_side[key].shape == model.state_dict()[key].shape, key


# --------------------------------------------------------------------------
# BPE ids -> codebook indices
# --------------------------------------------------------------------------


def image_token_name(code: int, width: int = 0) -> str:
    """Chameleon's naming: digits as letters A=0..J=9, then a closing 'Z'."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code).zfill(width)) + "Z"


def lumina_like_vocab(num_codes: int, permutation: list[int] | None = None, width: int = 0) -> dict:
    """Special tokens at 0..3, image tokens at BPE ids 4..4+num_codes-1 (as in
    Lumina-mGPT), then text and the reserved tokens."""
    codes = permutation or list(range(num_codes))
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<reserved0000>": 3}
    vocab.update({image_token_name(code, width): 4 + i for i, code in enumerate(codes)})
    first_text = 4 + num_codes
    vocab.update({"a": first_text, "IMG": first_text + 1, "<racm3:break>": first_text + 2})
    return vocab


def test_image_token_code():
    assert image_token_code("IMGIMGAZ") == 0
    assert image_token_code("IMGIMGBCZ") == 12
    assert image_token_code("IMGIMGIBJBZ") == 8191
    assert image_token_code("IMGIMGAABCZ") == 12  # zero-padded spelling
    for bad in ("IMGIMGZ", "IMGIMGXYZ", "IMGIMGB-Z", "IMGIMG", "IMGBCZ"):
        with pytest.raises(ValueError):
            image_token_code(bad)


def test_bpe_mapping_lumina_layout():
    vocab = lumina_like_vocab(8192)
    mapping = BPEToCodebook.from_vocab(vocab, num_embeddings=8192)
    assert mapping.num_codes == 8192
    assert torch.equal(mapping.image_token_ids, torch.arange(4, 8196))
    ids = torch.tensor([[4, 5], [8195, 4 + 1234]])
    codes = mapping(ids)
    assert codes.dtype == torch.int64 and torch.equal(codes, torch.tensor([[0, 1], [8191, 1234]]))
    assert torch.equal(mapping.to_bpe(codes), ids)
    assert mapping([4, 6]).tolist() == [0, 2]


@pytest.mark.parametrize("width", [0, 3])
def test_bpe_mapping_follows_names_and_agrees_with_transformers(width):
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    # Codes deliberately out of id order: the name, not the position, decides.
    permutation = [7, 3, 0, 11, 5, 1, 10, 2, 9, 4, 8, 6]
    vocab = lumina_like_vocab(12, permutation, width)
    mapping = BPEToCodebook.from_vocab(vocab, num_embeddings=12)
    reference = ChameleonImageVocabularyMapping(vocab).bpe2img
    ids = sorted(reference)
    assert mapping(ids).tolist() == [reference[i] for i in ids]
    assert mapping(torch.tensor(ids)).tolist() == permutation


def test_bpe_mapping_errors():
    mapping = BPEToCodebook.from_vocab(lumina_like_vocab(16))
    text_id = lumina_like_vocab(16)["a"]
    for bad in ([4, 0], [text_id], [100000], [-1]):
        with pytest.raises(ValueError, match="not image-token ids"):
            mapping(torch.tensor(bad))
    with pytest.raises(TypeError):
        mapping(torch.tensor([4.0]))
    with pytest.raises(ValueError, match="not codebook indices"):
        mapping.to_bpe([16])

    with pytest.raises(ValueError, match="no image tokens"):
        BPEToCodebook.from_vocab({"a": 0, "b": 1})
    with pytest.raises(ValueError, match="not each of 0..31"):
        BPEToCodebook.from_vocab(lumina_like_vocab(16), num_embeddings=32)
    duplicate = {image_token_name(3): 4, image_token_name(3, width=2): 5}
    with pytest.raises(ValueError, match="same codebook index"):
        BPEToCodebook.from_vocab(duplicate)


def test_bpe_ids_to_pixels():
    model = tiny_decoder()
    mapping = BPEToCodebook.from_vocab(lumina_like_vocab(16), num_embeddings=16)
    bpe = torch.arange(4, 20).view(1, 4, 4)
    out = model.decode(mapping(bpe))
    assert out.shape == (1, 3, 8, 8)
    assert torch.equal(out, model.decode(torch.arange(16).view(1, 4, 4)))
