"""A tiny Lumina-mGPT-shaped model, served by vLLM with SJD, turns a prompt into an image."""

import pytest

from tests.conftest import make_llm, shutdown, sjd_state_after_idle, spec_counters
from vllm_sjd.testing.tiny_chameleon import FIRST_WORD_ID, WORDS, build_tiny_chameleon, tiny_vq_decoder
from vllm_sjd.image_generation import decode_image, image_sampling_params
from vllm_sjd.layouts.chameleon import END_OF_TURN, ChameleonImageLayout

pytestmark = pytest.mark.engine

LAYOUT = ChameleonImageLayout(target_size=256)
PROMPT_IDS = [1, 300, 301, 302, 8710]  # token ids of a templated prompt, before the header


def prompt_ids(width: int, height: int) -> list[int]:
    return PROMPT_IDS + list(LAYOUT.header(width, height))


@pytest.fixture(scope="module")
def lumina(tmp_path_factory):
    return build_tiny_chameleon(tmp_path_factory.mktemp("lumina"), sharpness=3.0)


@pytest.fixture(scope="module")
def vq():
    return tiny_vq_decoder()  # 16x downsampling like Chameleon's VQGAN, tiny channels


@pytest.fixture(scope="module")
def sjd_llm(lumina):
    llm = make_llm(lumina, sjd={"num_speculative_tokens": 8}, max_model_len=1024)
    yield llm
    shutdown(llm)


def sizes_to_try():
    square = (256, 256)
    other = next((w, h) for w, h in LAYOUT.sizes if w != h and w * h <= 256 * 256 and min(w, h) >= 128)
    return [square, other]


@pytest.mark.parametrize("size", sizes_to_try())
def test_sjd_turns_a_prompt_into_an_image_of_the_requested_size(sjd_llm, vq, size):
    decoder, to_codebook = vq
    grid = LAYOUT.grid(*size)
    prompt = LAYOUT.prompt("a red circle on a black background", *size)
    before = spec_counters(sjd_llm)
    outputs = sjd_llm.generate(
        [prompt] * 2,
        [image_sampling_params(grid, temperature=1.0, top_k=2000, seed=s) for s in (1, 2)],
        use_tqdm=False,
    )
    after = spec_counters(sjd_llm)
    for output in outputs:
        # The template reached the model through the tokenizer.
        words = "a red circle on a black background".split()
        assert output.prompt_token_ids[-11:] == [FIRST_WORD_ID + WORDS.index(w) for w in words] + [
            END_OF_TURN, *LAYOUT.header(*size)
        ]
        assert FIRST_WORD_ID + WORDS.index("Generate") in output.prompt_token_ids
        tokens = output.outputs[0].token_ids
        assert len(tokens) == grid.num_tokens
        codes = grid.codes(tokens)  # raises if any forced token is wrong
        assert codes.shape == (grid.rows, grid.cols)
        image = decode_image(tokens, grid, to_codebook, decoder)
        assert image.size == size and image.mode == "RGB"
    # Forced end-of-line / end-of-image slots are drafted exactly, so
    # drafts are accepted even on a random model.
    assert after["num_accepted_tokens"] > before.get("num_accepted_tokens", 0)


def test_greedy_image_is_reproducible_and_layout_valid(sjd_llm):
    grid = LAYOUT.grid(256, 256)
    params = image_sampling_params(grid, temperature=0)
    first, second = (
        sjd_llm.generate([{"prompt_token_ids": prompt_ids(256, 256)}], params, use_tqdm=False)[0]
        for _ in range(2)
    )
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    grid.codes(first.outputs[0].token_ids)
    assert sjd_state_after_idle(sjd_llm) == [[]]


def test_plain_ar_with_the_layout_processor_gives_valid_images(lumina, vq):
    from vllm_sjd.layouts.logits_processor import LayoutLogitsProcessor

    decoder, to_codebook = vq
    llm = make_llm(lumina, skip_tokenizer_init=True, max_model_len=1024,
                   logits_processors=[LayoutLogitsProcessor])
    try:
        grids = [LAYOUT.grid(*size) for size in sizes_to_try()]
        outputs = llm.generate(
            [{"prompt_token_ids": prompt_ids(g.width, g.height)} for g in grids],
            [image_sampling_params(g, temperature=1.0, top_k=2000, seed=3) for g in grids],
            use_tqdm=False,
        )
    finally:
        shutdown(llm)
    for grid, output in zip(grids, outputs):
        image = decode_image(output.outputs[0].token_ids, grid, to_codebook, decoder)
        assert image.size == (grid.width, grid.height)


def test_an_sjd_step_reads_one_tensor_back_from_the_device(sjd_llm):
    """The host waits on the device once a step: for the drafts it hands vLLM.

    Counted in each step's sampling and proposal (vllm_sjd/testing/step_audit.py),
    as if every tensor lived on a GPU: guided pairs, layout columns, cells
    above, coupled drafts. Seeded requests: no random key is drawn. The first
    image of a size builds its layout tables (reads, once): it runs unaudited.
    """
    grid = LAYOUT.grid(256, 256)
    prompts = [{"prompt_token_ids": prompt_ids(256, 256)}] * 2
    params = [
        image_sampling_params(grid, temperature=1.0, top_k=100, seed=seed, guidance_scale=3.0,
                              unconditional_prompt_token_ids=[1, 8710])
        for seed in (3, 4)
    ]
    sjd_llm.generate(prompts[:1], params[:1], use_tqdm=False)
    sjd_llm.collective_rpc("sjd_step_audit", args=("start",))
    try:
        sjd_llm.generate(prompts, params, use_tqdm=False)
    finally:
        steps = sjd_llm.collective_rpc("sjd_step_audit", args=("stop",))[0]
    window_steps = [s for s in steps if s["drafts"] > 0]
    assert len(window_steps) >= 5
    too_many = [s["where"] for s in steps if s["host_reads"] > 1]
    assert not too_many, too_many
