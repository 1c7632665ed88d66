"""A tiny LlamaGen-T2I-shaped model with a tiny T5, served by vLLM with SJD,
turns a prompt into an image: caption embeddings in, VQ-16 pixels out."""

import pytest
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown, sjd_state_after_idle, spec_counters
from vllm_sjd.testing.tiny_llamagen import (
    CODEBOOK,
    IMAGE_SIZE,
    build_tiny_llamagen,
    build_tiny_t5,
    load_state,
    reference_greedy,
    reference_logits,
    tiny_config,
)
from vllm_sjd.image_generation import decode_image, image_sampling_params
from vllm_sjd.families import image_layout_for
from vllm_sjd.layouts.grid import UnsupportedImageSize
from vllm_sjd.layouts.llamagen import LlamaGenImageLayout
from vllm_sjd.vq.llamagen_vq import LlamaGenVQConfig, LlamaGenVQDecoder

pytestmark = pytest.mark.engine

CAPTIONS = ["a red circle on black background", "a cat on a blue square"]
SJD = {"num_speculative_tokens": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llamagen(tmp_path_factory.mktemp("llamagen"), seed=1)


@pytest.fixture(scope="module")
def encoder(model_dir, tmp_path_factory):
    from vllm_sjd.llamagen_text import LlamaGenTextEncoder

    return LlamaGenTextEncoder(build_tiny_t5(tmp_path_factory.mktemp("t5")), model_dir)


@pytest.fixture(scope="module")
def sjd_llm(model_dir):
    llm = make_llm(model_dir, sjd=SJD, skip_tokenizer_init=True, enable_prompt_embeds=True)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def decoder():
    # VQ-16's shape (five levels: 16x) with few channels and the model's 512 codes.
    config = LlamaGenVQConfig(codebook_size=CODEBOOK, z_channels=32, ch=32,
                              ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
    return LlamaGenVQDecoder(config)


def generate_images(llm, encoder, decoder):
    layout = image_layout_for(llm.llm_engine.model_config.hf_config)
    assert isinstance(layout, LlamaGenImageLayout) and layout.default_size == (IMAGE_SIZE,) * 2
    grid = layout.grid(*layout.default_size)
    prompts = encoder.prompts(CAPTIONS)
    params = [image_sampling_params(grid, temperature=1.0, top_k=100, seed=i) for i in range(2)]
    # The null-caption partner of the first caption runs as a plain token prompt.
    prompts.append({"prompt_token_ids": encoder.unconditional_prompt_token_ids(prompts[0])})
    params.append(image_sampling_params(grid, temperature=1.0, top_k=100, seed=7))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    images = []
    for output in outputs:
        tokens = output.outputs[0].token_ids
        assert len(tokens) == grid.num_tokens == (IMAGE_SIZE // 16) ** 2
        images.append(decode_image(tokens, grid, lambda codes: codes, decoder))
    return images


def test_sjd_makes_images_of_the_requested_size(sjd_llm, encoder, decoder):
    images = generate_images(sjd_llm, encoder, decoder)
    assert sjd_state_after_idle(sjd_llm) == [[]]
    assert spec_counters(sjd_llm)["num_draft_tokens"] > 0
    assert [im.size for im in images] == [(IMAGE_SIZE, IMAGE_SIZE)] * 3


def test_greedy_sjd_draws_llamagens_greedy_image(sjd_llm, model_dir, encoder):
    """Draft slots past the caption get image positions too: greedy SJD is
    LlamaGen's greedy decode, caption by prompt embeddings or null-caption ids."""
    config, state = tiny_config(), load_state(model_dir)
    features = encoder.caption_features(CAPTIONS)
    num = (IMAGE_SIZE // 16) ** 2
    expected = [reference_greedy(config, state, f, num) for f in features]
    expected.append(reference_greedy(config, state, None, num, caption_length=len(features[0])))
    prompts = encoder.prompts(CAPTIONS)
    prompts.append({"prompt_token_ids": encoder.unconditional_prompt_token_ids(prompts[0])})
    before = spec_counters(sjd_llm).get("num_accepted_tokens", 0)  # absent until one is accepted
    outputs = sjd_llm.generate(
        prompts, SamplingParams(max_tokens=num, temperature=0, ignore_eos=True), use_tqdm=False
    )
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    assert spec_counters(sjd_llm)["num_accepted_tokens"] > before


def test_guided_greedy_sjd_is_llamagens_guided_greedy(sjd_llm, model_dir, encoder):
    """Guidance at LlamaGen's 7.5 with the null caption of the same slots as the
    unconditional twin: generate.py's uncond + s * (cond - uncond), greedily."""
    config, state = tiny_config(), load_state(model_dir)
    layout = LlamaGenImageLayout.from_config(config)
    grid = layout.grid(*layout.default_size)
    scale = layout.default_guidance_scale
    expected = []
    for features in encoder.caption_features(CAPTIONS):
        tokens: list[int] = []
        for _ in range(grid.num_tokens):
            cond = reference_logits(config, state, features, tokens)[-1]
            uncond = reference_logits(config, state, None, tokens, len(features))[-1]
            tokens.append(int((uncond + scale * (cond - uncond)).argmax()))
        expected.append(tokens)
    prompts = encoder.prompts(CAPTIONS)
    params = [
        image_sampling_params(grid, temperature=0.0, guidance_scale=scale,
                              unconditional_prompt_token_ids=encoder.unconditional_prompt_token_ids(p))
        for p in prompts
    ]
    outputs = sjd_llm.generate(prompts, params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


def test_other_sizes_are_refused_with_the_list():
    layout = LlamaGenImageLayout.from_config(tiny_config())
    with pytest.raises(UnsupportedImageSize, match="supported sizes: 128x128"):
        layout.grid(256, 256)


def test_ar_makes_images_of_the_requested_size(model_dir, encoder, decoder):
    # Last in the file: a second engine resets vLLM's metrics, which the SJD
    # tests read from the shared engine.
    llm = make_llm(model_dir, skip_tokenizer_init=True, enable_prompt_embeds=True)
    try:
        images = generate_images(llm, encoder, decoder)
    finally:
        shutdown(llm)
    assert [im.size for im in images] == [(IMAGE_SIZE, IMAGE_SIZE)] * 3
