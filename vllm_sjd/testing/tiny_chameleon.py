"""Tiny random-weight Chameleon checkpoints in the real formats.

Lumina-mGPT (architecture ChameleonXLLMXForConditionalGeneration, with its
z_loss_weight config field) and Anole (ChameleonForConditionalGeneration), saved
by transformers as sharded safetensors with an index, with the real key names
(model.layers.N.self_attn.q_norm.weight, model.vqmodel.*, lm_head.weight...) and
a vocabulary_map whose image tokens are named as Chameleon names them.
"""

import json
from pathlib import Path

import torch

from vllm_sjd.layouts import chameleon as layout
from vllm_sjd.word_tokenizer import save_word_level_tokenizer

VOCAB_SIZE = 8960  # the real 65536 shrunk, keeping every special id we use
# A word-level stand-in for Chameleon's BPE tokenizer (ids past the size tokens).
WORDS = ["Generate", "an", "image", "of", "according", "to", "the", "following",
         "prompt:", "a", "red", "blue", "circle", "square", "on", "black", "background"]
FIRST_WORD_ID = 8900
# Height/width tokens <reserved08800>.. up to the first word id.
SIZE_TOKENS = {i: layout.reserved_token_name(i) for i in range(layout.SIZE_TOKEN_BASE, FIRST_WORD_ID)}


def image_token_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def vocabulary_map() -> dict[str, int]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({image_token_name(c): layout.CODE_LOW + c for c in range(8192)})
    vocab.update({"<eoss>": layout.IMAGE_END, layout.IMAGE_START_NAME: layout.IMAGE_START,
                  "<image>": 8711, "<reserved08799>": layout.END_OF_LINE,
                  layout.TURN_SEPARATOR: layout.END_OF_TURN})
    vocab.update({name: i for i, name in SIZE_TOKENS.items()})
    return vocab


def build_tiny_chameleon(path: Path, *, lumina: bool = True, seed: int = 0,
                         swin_norm: bool = False, sharpness: float = 1.0,
                         max_position_embeddings: int = 1024) -> Path:
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    config = ChameleonConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        swin_norm=swin_norm,
        vocabulary_map=vocabulary_map(),
        vq_config=dict(embed_dim=8, num_embeddings=8192, latent_channels=8, resolution=32,
                       base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                       attn_resolutions=[]),
        tie_word_embeddings=False,
    )
    model = ChameleonForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vqmodel" in name:
                continue
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.2)  # non-trivial affine norms, q_norm/k_norm too
            elif name.endswith("norm.bias"):
                param.normal_(0.0, 0.2)
            elif param.dim() > 1:
                param.normal_(0.0, param.shape[-1] ** -0.5)
        model.lm_head.weight.mul_(sharpness)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="1MB")
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    if lumina:
        saved["architectures"] = ["ChameleonXLLMXForConditionalGeneration"]
        saved["z_loss_weight"] = 1e-5
    else:
        saved["architectures"] = ["ChameleonForConditionalGeneration"]
    saved["torch_dtype"] = "float32"
    config_file.write_text(json.dumps(saved, indent=2))
    _save_tokenizer(path)
    return path


def _save_tokenizer(path: Path) -> None:
    vocab = vocabulary_map()
    vocab.update({word: FIRST_WORD_ID + i for i, word in enumerate(WORDS)})
    save_word_level_tokenizer(
        path, vocab, unk_token="<unk>",
        special_tokens={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
        additional_special_tokens=[layout.TURN_SEPARATOR, layout.IMAGE_START_NAME,
                                   *SIZE_TOKENS.values()],
    )


def reference_logits(path: Path, token_ids: list[int]) -> torch.Tensor:
    """[len, V] logits of transformers' Chameleon on the same weights.

    transformers' ChameleonForConditionalGeneration.forward sets image-token
    logits to the dtype minimum; the decoder's hidden states through lm_head
    are the unmasked logits.
    """
    from transformers import ChameleonForConditionalGeneration

    model = ChameleonForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([token_ids])).last_hidden_state
        return model.lm_head(hidden)[0]


def tiny_vq_decoder():
    """A random-weight Chameleon VQGAN decoder (16x, tiny channels) and its id mapping."""
    from transformers import ChameleonVQVAEConfig

    from vllm_sjd.vq.bpe_codebook import BPEToCodebook
    from vllm_sjd.vq.chameleon_vqgan import ChameleonVQGANDecoder

    config = ChameleonVQVAEConfig(
        embed_dim=8, num_embeddings=8192, latent_channels=8, resolution=256,
        base_channels=32, channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1,
        attn_resolutions=[16],
    )
    return ChameleonVQGANDecoder(config), BPEToCodebook.from_vocab(vocabulary_map(), 8192)


TINY_VQGAN_YAML = """\
model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 8
    n_embed: 8192
    ddconfig:
      double_z: false
      z_channels: 8
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 1, 1, 1, 1]
      num_res_blocks: 1
      attn_resolutions: []
      dropout: 0.0
"""


def write_tiny_vqgan(folder: Path, seed: int = 0) -> None:
    """vqgan.yaml + vqgan.safetensors of a random 16x Chameleon VQGAN decoder, in `folder`."""
    from safetensors.torch import save_file

    from vllm_sjd.vq.chameleon_vqgan import ChameleonVQGANDecoder

    (folder / "vqgan.yaml").write_text(TINY_VQGAN_YAML)
    torch.manual_seed(seed)
    decoder = ChameleonVQGANDecoder.from_yaml(folder / "vqgan.yaml")
    state = {k: v.contiguous() for k, v in decoder.state_dict().items()}
    save_file(state, str(folder / "vqgan.safetensors"))


class GuidedReference:
    """Teacher-forced guided logits of a tiny Chameleon checkpoint (transformers).

    For a generated sequence, both streams are run once over their prompt plus
    the sequence; row i is uncond + s * (cond - uncond) before token i, masked
    to the image layout: what SJD must have verified (or taken the argmax of).
    """

    def __init__(self, path: Path):
        from transformers import ChameleonForConditionalGeneration

        self.model = ChameleonForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()

    def _logits(self, context: list[int], tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([context + tokens[:-1]])
        with torch.no_grad():
            hidden = self.model.model(input_ids=ids).last_hidden_state
            return self.model.lm_head(hidden)[0, len(context) - 1:].to(torch.float64)

    def guided_logits(self, prompt, unconditional_prompt, tokens, scale: float, grid) -> torch.Tensor:
        tokens = list(tokens)
        cond = self._logits(list(prompt), tokens)
        uncond = self._logits(list(unconditional_prompt), tokens)
        guided = uncond + scale * (cond - uncond)
        allowed = grid.allowed_mask(torch.arange(len(tokens)), guided.shape[-1])
        return guided.masked_fill(~allowed, float("-inf"))


def add_sjd2_timesteps(path: Path, *, noise_levels: int = 4, seed: int = 0, scale: float = 0.5) -> Path:
    """Make a tiny checkpoint look SJD2 fine-tuned: the "sjd2" config entry (the image
    codes' mean embedding RMS) and a random timestep table (level 0 zero) in its own shard."""
    from safetensors.torch import load_file, save_file

    from vllm_sjd.core.denoising import TIMESTEP_WEIGHT, NoiseSettings, embedding_rms

    path = Path(path)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    embed_key = "model.embed_tokens.weight"
    embeddings = load_file(str(path / index["weight_map"][embed_key]))[embed_key]
    codes = embeddings[layout.CODE_LOW: layout.CODE_LOW + 8192]
    settings = NoiseSettings(noise_levels, float(embedding_rms(codes).mean()))
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(noise_levels + 1, embeddings.shape[-1], generator=gen) * scale * settings.embedding_rms
    table[0] = 0
    save_file({TIMESTEP_WEIGHT: table.contiguous()}, str(path / "sjd2-timesteps.safetensors"))
    index["weight_map"][TIMESTEP_WEIGHT] = "sjd2-timesteps.safetensors"
    index_file.write_text(json.dumps(index, indent=2))
    config_file = path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **settings.as_config()}, indent=2))
    return path
