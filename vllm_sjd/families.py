"""The model families the plugin serves: one row per checkpoint architecture.

Each row names the vLLM model class the plugin registers, the image layout
(which token each generated position may hold, the family's sampling
defaults) and the VQ decoder that turns the tokens into pixels. The model
registry (models/), the image endpoint's decoder choice (image_decoders.py)
and the speculative-config patch (is this an image model?) all read it.

Importing this module is cheap (vLLM imports the plugin in every process):
layouts and decoders load when first asked for.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_sjd.contract import LAYOUT_CONFIG_FIELD


class NotAnImageModel(ValueError):
    """A checkpoint whose architecture is none of the plugin's families."""


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str  # "module:Class", registered with vLLM's ModelRegistry
    layout: Callable  # (hf_config, target_size | None) -> the family's image layout
    decoder: Callable  # (vq folder, hf_config) -> ImageDecoder
    vq_files: str  # what the decoder reads, for messages and docs


def _lumina_layout(hf_config, target_size: int | None = None):
    """Lumina-mGPT at `target_size` (512, 768 or 1024: its checkpoint's name says).

    A Lumina-format config may name its own layout in the optional field
    LAYOUT_CONFIG_FIELD, {"target_size": 64, "downsample": 4, "num_codes": 512}
    (px per code 16 and 8192 codes if absent), as the bundled demo model does;
    an explicit target_size wins over the config's.
    """
    from vllm_sjd.layouts.chameleon import ChameleonImageLayout

    own = getattr(hf_config, LAYOUT_CONFIG_FIELD, None) or {}
    return ChameleonImageLayout(
        target_size or own.get("target_size") or 768,
        own.get("downsample", 16),
        own.get("num_codes", 8192),
    )


def _anole_layout(hf_config, target_size: int | None = None):
    from vllm_sjd.layouts.chameleon import AnoleImageLayout

    return AnoleImageLayout()


def _emu3_layout(hf_config, target_size: int | None = None):
    from vllm_sjd.layouts.emu3 import Emu3ImageLayout

    return Emu3ImageLayout(hf_config.vocabulary_map)


def _llamagen_layout(hf_config, target_size: int | None = None):
    from vllm_sjd.layouts.llamagen import LlamaGenImageLayout

    return LlamaGenImageLayout.from_config(hf_config)


def _janus_layout(hf_config, target_size: int | None = None):
    from vllm_sjd.layouts.janus import JanusImageLayout

    return JanusImageLayout.from_config(hf_config)


def _chameleon_decoder(folder: Path, hf_config):
    from vllm_sjd.image_decoders import chameleon_decoder

    return chameleon_decoder(folder, hf_config)


def _emu3_decoder(folder: Path, hf_config):
    from vllm_sjd.image_decoders import emu3_decoder

    return emu3_decoder(folder, hf_config)


def _llamagen_decoder(folder: Path, hf_config):
    from vllm_sjd.image_decoders import llamagen_decoder

    return llamagen_decoder(folder, hf_config)


def _janus_decoder(folder: Path, hf_config):
    from vllm_sjd.image_decoders import janus_decoder

    return janus_decoder(folder, hf_config)


CHAMELEON_VQ_FILES = "vqgan.yaml with vqgan.ckpt or vqgan.safetensors (or the demo's vq/decoder.safetensors)"

FAMILIES: dict[str, Family] = {
    # Lumina-mGPT 7B/34B: Chameleon weights under Lumina-mGPT's config class.
    "ChameleonXLLMXForConditionalGeneration": Family(
        "Lumina-mGPT", "vllm_sjd.models.chameleon:ChameleonImageGenerator",
        _lumina_layout, _chameleon_decoder, CHAMELEON_VQ_FILES,
    ),
    # Anole (and Chameleon) in transformers' layout.
    "ChameleonForConditionalGeneration": Family(
        "Anole", "vllm_sjd.models.chameleon:ChameleonImageGenerator",
        _anole_layout, _chameleon_decoder, CHAMELEON_VQ_FILES,
    ),
    # Emu3-Gen in transformers' layout (vLLM serves it for understanding only).
    "Emu3ForConditionalGeneration": Family(
        "Emu3-Gen", "vllm_sjd.models.emu3:Emu3ImageGenerator",
        _emu3_layout, _emu3_decoder, "an Emu3VQVAE folder (config.json, safetensors)",
    ),
    # LlamaGen-T2I (t2i_XL_stage1_256 / stage2_512): a folder with our config.json.
    "LlamaGenT2IForCausalLM": Family(
        "LlamaGen-T2I", "vllm_sjd.models.llamagen:LlamaGenT2IForCausalLM",
        _llamagen_layout, _llamagen_decoder,
        "vq_ds16_t2i.pt or vq_ds16_t2i.safetensors (optional vq_config.json)",
    ),
    # Janus-Pro 1B/7B in transformers' layout: the generation path only.
    "JanusForConditionalGeneration": Family(
        "Janus-Pro", "vllm_sjd.models.janus:JanusImageGenerator",
        _janus_layout, _janus_decoder, "the checkpoint's own model.vqmodel.* weights",
    ),
}


def architecture_of(hf_config) -> str:
    return (getattr(hf_config, "architectures", None) or ["?"])[0]


def is_image_architecture(architectures) -> bool:
    return any(a in FAMILIES for a in architectures or ())


def family_of(hf_config) -> Family:
    architecture = architecture_of(hf_config)
    family = FAMILIES.get(architecture)
    if family is None:
        raise NotAnImageModel(
            f"{architecture} has no image layout: it is not an image-generating model of this plugin; "
            f"image models: {', '.join(FAMILIES)}"
        )
    return family


def image_layout_for(hf_config, target_size: int | None = None):
    """The image layout of a checkpoint, from its (transformers) config."""
    return family_of(hf_config).layout(hf_config, target_size)
