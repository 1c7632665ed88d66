"""Engine-free tests of reading Chameleon VQGAN files: checkpoints and vqgan.yaml.

Tiny random-weight decoders on CPU; the full-size default config is built on
the meta device only.
"""

import pickle

import pytest
import torch
from safetensors.torch import save_file
from transformers import ChameleonVQVAEConfig

from vllm_sjd.testing.tiny_vqgan import TINY, random_grid, tiny_decoder
from vllm_sjd.checkpoints import CheckpointError
from vllm_sjd.vq.chameleon_vqgan import ChameleonVQGANDecoder, config_from_yaml, read_decoder_state_dict

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
    with pytest.raises(CheckpointError, match=r"missing: decoder\.up\.1\.attn\.0\.q\.weight"):
        tiny_decoder().load_checkpoint(path)

    # Weights for attention this config lacks: the yaml and the checkpoint disagree.
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"unexpected: decoder\.up\.1\.attn\.0\.k\.bias"):
        tiny_decoder(attn_resolutions=[]).load_checkpoint(path)

    with pytest.raises(CheckpointError, match=r"shape mismatch: quantize\.embedding\.weight"):
        tiny_decoder(num_embeddings=32).load_checkpoint(path)

    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="no decoder weights"):
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

    with pytest.raises(CheckpointError, match="refused") as info:
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
