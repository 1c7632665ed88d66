"""Janus-Pro's generation path in vLLM: a tiny checkpoint in transformers' format.

The language model on vLLM's Llama, codes through the generation embedding,
aligner and head, the codes' ids past the text vocabulary; compared with
transformers' JanusForConditionalGeneration of the same weights.
"""

import functools
import json

import pytest
import torch

from tests.conftest import assert_vllm_logits_match, make_llm, shutdown, spec_counters
from tests.stats import chi_square_pvalue
from vllm_sjd.families import image_layout_for
from vllm_sjd.image_decoders import image_decoder_for
from vllm_sjd.image_generation import image_sampling_params
from vllm_sjd.layouts.janus import JanusImageLayout
from vllm_sjd.testing.tiny_janus import (
    IMAGE_SIZE,
    NUM_CODES,
    TEXT_VOCAB,
    build_tiny_janus,
    exact_guided_code_probs,
    load_reference,
    reference_guided_greedy,
    served_heads,
)

pytestmark = pytest.mark.engine

CAPTIONS = ["a red circle", "a blue square on black background"]
SJD = {"num_speculative_tokens": 8}
SIDE = IMAGE_SIZE // 16
NUM_CHI_SQUARE_SAMPLES = 6000
ALPHA = 1e-4  # as tests/test_lossless.py


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    return build_tiny_janus(tmp_path_factory.mktemp("janus"))


@pytest.fixture(scope="module")
def tokenizer(janus_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(janus_dir)


@pytest.fixture(scope="module")
def layout(janus_dir):
    from transformers import AutoConfig

    return JanusImageLayout.from_config(AutoConfig.from_pretrained(janus_dir))


def guided_prompts(layout, tokenizer):
    """(conditional ids, unconditional ids) per caption, as the image endpoint makes them."""
    pairs = []
    for caption in CAPTIONS:
        ids = tokenizer(layout.prompt(caption, IMAGE_SIZE, IMAGE_SIZE))["input_ids"]
        pairs.append((ids, layout.unconditional_of(ids, tokenizer)))
    return pairs


@pytest.fixture(scope="module")
def expected_greedy(janus_dir, layout, tokenizer):
    reference = load_reference(janus_dir)
    return [reference_guided_greedy(reference, c, u, layout.default_guidance_scale, SIDE * SIDE)
            for c, u in guided_prompts(layout, tokenizer)]


def guided_greedy(llm, layout, tokenizer) -> list[list[int]]:
    grid = layout.grid(IMAGE_SIZE, IMAGE_SIZE)
    pairs = guided_prompts(layout, tokenizer)
    params = [image_sampling_params(grid, temperature=0.0, guidance_scale=layout.default_guidance_scale,
                                    unconditional_prompt_token_ids=u) for _, u in pairs]
    outputs = llm.generate([{"prompt_token_ids": c} for c, _ in pairs], params, use_tqdm=False)
    return [[t - TEXT_VOCAB for t in o.outputs[0].token_ids] for o in outputs]


def sampled_images(llm, janus_dir, layout, tokenizer):
    grid = layout.grid(IMAGE_SIZE, IMAGE_SIZE)
    pairs = guided_prompts(layout, tokenizer)
    params = [image_sampling_params(grid, temperature=1.0, seed=i, guidance_scale=5.0,
                                    unconditional_prompt_token_ids=u) for i, (_, u) in enumerate(pairs)]
    outputs = llm.generate([{"prompt_token_ids": c} for c, _ in pairs], params, use_tqdm=False)
    decode = image_decoder_for(janus_dir, llm.llm_engine.model_config.hf_config)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    for t in tokens:
        assert len(t) == SIDE * SIDE and all(TEXT_VOCAB <= i < TEXT_VOCAB + NUM_CODES for i in t)
    return tokens, [decode(t, grid) for t in tokens]


@pytest.fixture(scope="module")
def sjd_llm(janus_dir):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model sends a function
        llm = make_llm(janus_dir, sjd=SJD)
        yield llm
        shutdown(llm)


def test_the_checkpoint_is_transformers_janus(janus_dir):
    config = json.loads((janus_dir / "config.json").read_text())
    assert config["architectures"] == ["JanusForConditionalGeneration"]
    from safetensors import safe_open

    with safe_open(str(janus_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for key in ("model.generation_embeddings.weight", "model.generation_aligner.fc1.weight",
                "model.generation_head.vision_head.weight", "lm_head.weight",
                "model.language_model.layers.0.self_attn.q_proj.weight"):
        assert key in keys
    assert any(k.startswith("model.vqmodel.decoder.") for k in keys)
    assert any(k.startswith("model.vision_model.") for k in keys)


def reference_hidden(janus_dir, text: list[int], codes: list[int]):
    """transformers' model, and its last hidden states after text then code inputs."""
    reference = load_reference(janus_dir)
    with torch.no_grad():
        embeds = torch.cat([reference.get_input_embeddings()(torch.tensor([text])),
                            reference.prepare_embeddings_for_image_generation(torch.tensor([codes]))], 1)
        return reference, reference.model.language_model(inputs_embeds=embeds).last_hidden_state[0]


def test_code_logits_match_transformers(janus_dir, layout, tokenizer):
    """Every position scored by the generation head after text and code inputs
    (text ids -inf: the model makes images only): vLLM's prompt logprobs equal
    transformers'."""
    text = tokenizer(layout.prompt("a red circle", IMAGE_SIZE, IMAGE_SIZE))["input_ids"]
    codes = [5, 17, 63, 0, 40, 40, 9]
    reference, hidden = reference_hidden(janus_dir, text, codes)
    with torch.no_grad():
        code_logits = reference.model.generation_head(hidden)
    logits = torch.cat([torch.full((len(hidden), TEXT_VOCAB), float("-inf")), code_logits], -1)
    assert_vllm_logits_match(janus_dir, text + [TEXT_VOCAB + c for c in codes], logits)


def test_both_heads_of_the_served_model_equal_transformers(sjd_llm, janus_dir):
    """The heads as the engine loaded them, on transformers' hidden states
    (lm_head is loaded though image generation never runs it)."""
    reference, hidden = reference_hidden(janus_dir, [1, 4, 9, 10, 6], [3, 60])
    text, codes = map(torch.tensor, sjd_llm.apply_model(functools.partial(served_heads, hidden))[0])
    with torch.no_grad():
        assert torch.allclose(text, reference.lm_head(hidden), atol=1e-5)
        assert torch.allclose(codes[:, TEXT_VOCAB:], reference.model.generation_head(hidden), atol=1e-5)
    assert torch.isinf(codes[:, :TEXT_VOCAB]).all()


def test_guided_greedy_sjd_is_transformers_guided_greedy(sjd_llm, layout, tokenizer, expected_greedy):
    assert guided_greedy(sjd_llm, layout, tokenizer) == expected_greedy
    assert spec_counters(sjd_llm)["num_accepted_tokens"] > 0


def test_the_engine_counts_the_codes_in_its_vocabulary(sjd_llm):
    model_config = sjd_llm.llm_engine.model_config
    assert model_config.get_vocab_size() == TEXT_VOCAB + NUM_CODES
    assert image_layout_for(model_config.hf_config).text_vocab_size == TEXT_VOCAB


def test_sjd_images_are_seeded_grids_of_codes(sjd_llm, janus_dir, layout, tokenizer):
    tokens, images = sampled_images(sjd_llm, janus_dir, layout, tokenizer)
    assert [im.size for im in images] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2
    assert tokens[0] != tokens[1]
    assert sampled_images(sjd_llm, janus_dir, layout, tokenizer)[0] == tokens


@pytest.mark.parametrize("drafting", ["independent", "gumbel", None])
def test_other_drafting_modes_and_ar_make_images(janus_dir, layout, tokenizer, drafting):
    """None: plain AR (no speculation) on the same model."""
    llm = make_llm(janus_dir, sjd=None if drafting is None else {**SJD, "drafting": drafting})
    try:
        _, images = sampled_images(llm, janus_dir, layout, tokenizer)
    finally:
        shutdown(llm)
    assert [im.size for im in images] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2


def test_tensor_parallel_2_gives_the_guided_greedy_tokens(janus_dir, layout, tokenizer, expected_greedy):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        llm = make_llm(janus_dir, sjd=SJD, tensor_parallel_size=2)
    try:
        assert guided_greedy(llm, layout, tokenizer) == expected_greedy
    finally:
        shutdown(llm)


def test_guided_sjd_on_janus_samples_the_exact_guided_distribution(tmp_path, tokenizer):
    """A 2x2-code Janus: SJD (coupled drafts, initial drafts from the cell above,
    a window of 2) with Janus's guidance against the exact guided distribution
    over the generation head; the unguided distribution fails the same test."""
    from transformers import AutoConfig

    path = build_tiny_janus(tmp_path / "janus-2x2", image_size=32, sharpness=1.0)
    layout = JanusImageLayout.from_config(AutoConfig.from_pretrained(path))
    grid = layout.grid(32, 32)
    cond = tokenizer(layout.prompt("a red circle", 32, 32))["input_ids"]
    uncond = layout.unconditional_of(cond, tokenizer)
    reference = load_reference(path)
    options = dict(temperature=0.6, top_k=3)
    exact = exact_guided_code_probs(reference, cond, uncond, 5.0, grid.num_tokens, **options)
    unguided = exact_guided_code_probs(reference, cond, cond, 1.0, grid.num_tokens, **options)
    llm = make_llm(path, sjd={"num_speculative_tokens": 2, "dynamic_num_speculative_tokens": "off"},
                   max_num_seqs=256)
    try:
        params = image_sampling_params(grid, guidance_scale=5.0, unconditional_prompt_token_ids=uncond,
                                       **options)
        outputs = llm.generate([{"prompt_token_ids": cond}] * NUM_CHI_SQUARE_SAMPLES, params,
                               use_tqdm=False)
        counters = spec_counters(llm)
    finally:
        shutdown(llm)
    samples = [tuple(t - TEXT_VOCAB for t in o.outputs[0].token_ids) for o in outputs]
    assert grid.num_tokens == 4 and len(exact) == 3**4
    assert counters["num_accepted_tokens"] > 0.1 * NUM_CHI_SQUARE_SAMPLES
    assert chi_square_pvalue(samples, exact) > ALPHA
    assert chi_square_pvalue(samples, unguided) < ALPHA


def test_a_checkpoint_without_the_generation_head_stops_the_engine_naming_it(tmp_path, capfd):
    """Left random, the head would make noise images without a word."""
    from safetensors.torch import load_file, save_file

    path = build_tiny_janus(tmp_path / "headless")
    weights = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("model.generation_head.")},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception):
        make_llm(path, sjd=SJD)
    logs = capfd.readouterr()
    assert "lacks Janus's generation weights: generation_head.proj_out.bias" in logs.out + logs.err
