"""A tiny Emu3-shaped model, served by vLLM with SJD, turns a prompt into an image."""

import pytest

from tests.conftest import make_llm, shutdown, sjd_state_after_idle
from vllm_sjd.testing.tiny_emu3 import build_tiny_emu3, vocabulary_map
from vllm_sjd.image_generation import decode_image, image_sampling_params
from vllm_sjd.layouts.logits_processor import LayoutLogitsProcessor
from vllm_sjd.layouts.emu3 import Emu3ImageLayout, generate_size
from vllm_sjd.vq.emu3 import Emu3ImageDecoder

pytestmark = pytest.mark.engine

# A small image area keeps the grids short on CPU: 1:1 is 12x12 tokens (96 px).
LAYOUT = Emu3ImageLayout(vocabulary_map(), image_area=96 * 96)
SIZES = [generate_size("1:1", 96 * 96), generate_size("4:3", 96 * 96)]


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    return build_tiny_emu3(tmp_path_factory.mktemp("emu3"))


@pytest.fixture(scope="module")
def decoder(emu3):
    from transformers import Emu3ForConditionalGeneration

    model = Emu3ForConditionalGeneration.from_pretrained(emu3).eval()
    return Emu3ImageDecoder.from_vq_model(model.model.vqmodel, vocabulary_map())


def generate_images(llm, decoder):
    grids = [LAYOUT.grid(*size) for size in SIZES]
    prompts = [LAYOUT.prompt("a red circle on black background", *size) for size in SIZES]
    outputs = llm.generate(
        prompts, [image_sampling_params(g, temperature=1.0, top_k=2048, seed=i) for i, g in enumerate(grids)],
        use_tqdm=False,
    )
    images = []
    for grid, output in zip(grids, outputs):
        tokens = output.outputs[0].token_ids
        assert len(tokens) == grid.num_tokens
        images.append(decode_image(tokens, grid, decoder.codes_from_tokens, decoder))
    return images


def test_sjd_and_ar_make_images_of_the_requested_sizes(emu3, decoder):
    assert SIZES[0] != SIZES[1]
    llm = make_llm(emu3, sjd={"num_speculative_tokens": 8}, max_model_len=1024)
    try:
        sjd_images = generate_images(llm, decoder)
        assert sjd_state_after_idle(llm) == [[]]
    finally:
        shutdown(llm)
    assert [im.size for im in sjd_images] == SIZES

    llm = make_llm(emu3, max_model_len=1024, logits_processors=[LayoutLogitsProcessor])
    try:
        ar_images = generate_images(llm, decoder)
    finally:
        shutdown(llm)
    assert [im.size for im in ar_images] == SIZES


def test_the_prompt_carries_emus_size_header(emu3):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(emu3)
    ids = tokenizer(LAYOUT.prompt("a red circle", *SIZES[0]))["input_ids"]
    vocab = vocabulary_map()
    assert ids[-3] == vocab["<|image start|>"] and ids[-1] == vocab["<|image token|>"]
