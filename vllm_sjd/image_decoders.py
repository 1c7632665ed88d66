"""The VQ decoder that turns a served model's image tokens into pixels.

`image_decoder_for` asks the model's family (families.py) for its decoder;
`vq_path` is the image option "vq", else the checkpoint folder itself:
- Chameleon family (Lumina-mGPT, Anole): Chameleon's VQGAN, `vqgan.yaml` plus
  `vqgan.ckpt` or `vqgan.safetensors`; or, as the bundled demo model ships it,
  `vq/decoder.safetensors` shaped by the config's own vq_config. Image token
  ids map to codes through the checkpoint's vocabulary_map;
- Emu3-Gen: a folder holding transformers' Emu3VQVAE (config.json of
  model_type "emu3_vqgan" and its safetensors);
- LlamaGen-T2I: LlamaGen's VQ-16, `vq_ds16_t2i.pt` or `vq_ds16_t2i.safetensors`,
  shaped by an optional `vq_config.json` (LlamaGenVQConfig's fields; VQ-16's
  own when absent). Image token ids are the codes;
- Janus-Pro: transformers' JanusVQVAE from the checkpoint's own safetensors
  (model.vqmodel.*). Image token ids are the codes after the text vocabulary.
"""

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from vllm_sjd.families import family_of
from vllm_sjd.image_generation import decode_image, decode_partial_image
from vllm_sjd.layouts.grid import ImageGrid


class NoImageDecoder(ValueError):
    """The served model has no VQ decoder the plugin can find."""


class ImageDecoder:
    """tokens of one image -> PIL image, for one served model."""

    def __init__(self, to_codebook, decoder) -> None:
        self.to_codebook = to_codebook
        self.decoder = decoder

    def __call__(self, tokens: Sequence[int], grid: ImageGrid) -> Image.Image:
        return decode_image(tokens, grid, self.to_codebook, self.decoder)

    def partial(self, tokens: Sequence[int], grid: ImageGrid) -> Image.Image:
        """The rows complete in an image's first tokens, the rest neutral grey."""
        return decode_partial_image(tokens, grid, self.to_codebook, self.decoder)


def image_decoder_for(model_path: str | Path, hf_config, vq_path: str | Path | None = None) -> ImageDecoder:
    try:
        family = family_of(hf_config)
    except ValueError as err:
        raise NoImageDecoder(str(err)) from None
    return family.decoder(Path(vq_path or model_path), hf_config)


def chameleon_decoder(folder: Path, hf_config) -> ImageDecoder:
    from vllm_sjd.vq.bpe_codebook import BPEToCodebook
    from vllm_sjd.vq.chameleon_vqgan import ChameleonVQGANDecoder

    own = folder / "vq" / "decoder.safetensors"
    if own.is_file() and getattr(hf_config, "vq_config", None) is not None:
        decoder = ChameleonVQGANDecoder(hf_config.vq_config).load_checkpoint(own).eval()
        num_codes = decoder.config.num_embeddings
        return ImageDecoder(BPEToCodebook.from_vocab(hf_config.vocabulary_map, num_codes), decoder)
    yaml_path = folder / "vqgan.yaml"
    weights = _first_file(folder, ("vqgan.safetensors", "vqgan.ckpt"))
    if not yaml_path.is_file() or weights is None:
        raise NoImageDecoder(
            "the Chameleon family decodes with Chameleon's VQGAN: put vqgan.yaml and "
            f"vqgan.ckpt (or vqgan.safetensors) in {folder}, or name their folder with "
            "the image option 'vq'"
        )
    decoder = ChameleonVQGANDecoder.from_yaml(yaml_path, weights).eval()
    num_codes = decoder.config.num_embeddings
    return ImageDecoder(BPEToCodebook.from_vocab(hf_config.vocabulary_map, num_codes), decoder)


def emu3_decoder(folder: Path, hf_config) -> ImageDecoder:
    from vllm_sjd.vq.emu3 import Emu3ImageDecoder

    if not (folder / "config.json").is_file():
        raise NoImageDecoder(
            f"Emu3-Gen needs its vision tokenizer: pass the folder of an Emu3VQVAE "
            f"checkpoint as the image option 'vq' (looked in {folder})"
        )
    decoder = Emu3ImageDecoder.from_pretrained(folder, hf_config.vocabulary_map)
    return ImageDecoder(decoder.codes_from_tokens, decoder)


def llamagen_decoder(folder: Path, hf_config) -> ImageDecoder:
    from vllm_sjd.vq.llamagen_vq import LlamaGenVQConfig, LlamaGenVQDecoder

    weights = _first_file(folder, ("vq_ds16_t2i.safetensors", "vq_ds16_t2i.pt"))
    if weights is None:
        raise NoImageDecoder(
            f"LlamaGen-T2I decodes with LlamaGen's VQ-16: put vq_ds16_t2i.pt in {folder}, or "
            "name the folder of vq_ds16_t2i.pt or .safetensors with the image option 'vq' (a "
            ".safetensors beside the model's own weights would be read as model weights)"
        )
    fields = {}
    if (folder / "vq_config.json").is_file():
        fields = json.loads((folder / "vq_config.json").read_text())
        fields["ch_mult"] = tuple(fields.get("ch_mult", LlamaGenVQConfig.ch_mult))
    config = LlamaGenVQConfig(**{"codebook_size": hf_config.codebook_size, **fields})
    decoder = LlamaGenVQDecoder.from_checkpoint(weights, config)
    return ImageDecoder(lambda codes: codes, decoder)


def janus_decoder(folder: Path, hf_config) -> ImageDecoder:
    from vllm_sjd.checkpoints import CheckpointError
    from vllm_sjd.vq.janus import JanusImageDecoder

    try:
        decoder = JanusImageDecoder.from_checkpoint(folder, hf_config)
    except CheckpointError as e:
        raise NoImageDecoder(f"{e}; or name the Janus checkpoint's folder with the image option 'vq'") from None
    return ImageDecoder(decoder.codes_from_tokens, decoder)


def _first_file(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)
