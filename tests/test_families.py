"""vllm_sjd/families.py: one row per architecture, read by the registry, the decoder choice and the patch."""

import importlib
from types import SimpleNamespace

import pytest
import torch

from vllm_sjd.families import FAMILIES, NotAnImageModel, family_of, image_layout_for, is_image_architecture
from vllm_sjd.image_decoders import NoImageDecoder, image_decoder_for
from vllm_sjd.testing.tiny_llamagen import CODEBOOK, IMAGE_SIZE, tiny_config, write_tiny_vq16


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_every_row_names_an_importable_vllm_model_class(architecture):
    module, name = FAMILIES[architecture].model_class.split(":")
    model_class = getattr(importlib.import_module(module), name)
    assert callable(getattr(model_class, "compute_logits"))


def test_the_registry_and_the_patch_see_exactly_the_table():
    from vllm import ModelRegistry

    import vllm_sjd

    vllm_sjd.register()
    assert set(FAMILIES) <= set(ModelRegistry.get_supported_archs())
    assert all(is_image_architecture([a]) for a in FAMILIES)
    assert not is_image_architecture(["LlamaForCausalLM"])
    with pytest.raises(NotAnImageModel, match="image models: "):
        family_of(SimpleNamespace(architectures=["LlamaForCausalLM"]))


def test_llamagen_decoder_is_found_in_its_folder(tmp_path):
    """The family the decoder list used to lack: VQ-16 weights plus an optional vq_config.json."""
    source = write_tiny_vq16(tmp_path)

    hf_config = tiny_config()
    grid = image_layout_for(hf_config).grid(IMAGE_SIZE, IMAGE_SIZE)
    decode = image_decoder_for("/nowhere", hf_config, tmp_path)
    tokens = torch.randint(0, CODEBOOK, (grid.num_tokens,), generator=torch.Generator().manual_seed(1))
    image = decode(tokens.tolist(), grid)
    expected = source.to_pil(source.decode(tokens.view(1, grid.rows, grid.cols)))[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert image.tobytes() == expected.tobytes()


@pytest.mark.parametrize("architecture, named", [
    ("ChameleonXLLMXForConditionalGeneration", "vqgan.yaml"),
    ("Emu3ForConditionalGeneration", "Emu3VQVAE"),
    ("LlamaGenT2IForCausalLM", "vq_ds16_t2i.pt"),
])
def test_a_missing_decoder_names_the_files_it_needs(tmp_path, architecture, named):
    hf_config = SimpleNamespace(architectures=[architecture], vocabulary_map={}, codebook_size=16)
    with pytest.raises(NoImageDecoder, match=named):
        image_decoder_for(tmp_path, hf_config)


def test_a_text_model_has_no_decoder(tmp_path):
    with pytest.raises(NoImageDecoder, match="not an image-generating model"):
        image_decoder_for(tmp_path, SimpleNamespace(architectures=["LlamaForCausalLM"]))
