"""Classifier-free guidance under SJD samples exactly the guided AR distribution.

As tests/test_lossless.py, with guidance: every request runs as a pair (the
prompt and an unconditional prompt) and the verified distribution is the
guided one, uncond + s * (cond - uncond), after temperature and top-k. The
exact guided distribution comes from teacher forcing both streams with
transformers. A proposer reporting a wrong q fails the same test.
"""

import pytest
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown, sjd_state_after_idle, spec_counters
from tests.stats import chi_square_pvalue
from tests.tiny_model import exact_continuation_probs
from vllm_sjd.guidance import guidance_extra_args

PROMPT = [7, 12, 30]
UNCONDITIONAL_PROMPT = [40]
SCALE = 3.0
LENGTH = 6
TEMPERATURE = 0.6
TOP_K = 2
NUM_SAMPLES = 8_000
WINDOW = 4
ALPHA = 1e-4

pytestmark = pytest.mark.engine


def exact(model, scale: float):
    return exact_continuation_probs(
        model, PROMPT, LENGTH, temperature=TEMPERATURE, top_k=TOP_K,
        guidance_scale=scale, unconditional_prompt=UNCONDITIONAL_PROMPT,
    )


@pytest.fixture(scope="module")
def exact_guided(contextual_model):
    return exact(contextual_model, SCALE)


@pytest.fixture(scope="module")
def llm(contextual_model):
    # FaultyQProposer with no fault set drafts and reports q exactly as
    # SJDProposer (it only overrides the window hook to inject a fault).
    engine = make_llm(
        contextual_model,
        sjd={
            "num_speculative_tokens": WINDOW,
            "initial_drafts": "last_distribution",
            "proposer": "tests.faulty_proposers.FaultyQProposer",
        },
        max_num_seqs=256,
    )
    yield engine
    shutdown(engine)


def sample(llm) -> list[tuple[int, ...]]:
    params = SamplingParams(
        temperature=TEMPERATURE, top_k=TOP_K, max_tokens=LENGTH, ignore_eos=True,
        extra_args=guidance_extra_args(SCALE, UNCONDITIONAL_PROMPT),
    )
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * NUM_SAMPLES, params, use_tqdm=False)
    for output in outputs:
        # The twin stays invisible: one completion per request, its own prompt.
        assert output.prompt_token_ids == PROMPT and len(output.outputs) == 1
    return [tuple(o.outputs[0].token_ids) for o in outputs]


def test_guided_sjd_matches_the_exact_guided_distribution(llm, exact_guided, contextual_model):
    before = spec_counters(llm)
    samples = sample(llm)
    after = spec_counters(llm)
    assert all(len(s) == LENGTH for s in samples)
    accepted = after["num_accepted_tokens"] - before.get("num_accepted_tokens", 0)
    assert accepted > 0.1 * NUM_SAMPLES
    assert chi_square_pvalue(samples, exact_guided) > ALPHA
    # Guidance changed the distribution: the unguided one does not fit.
    assert chi_square_pvalue(samples, exact(contextual_model, 1.0)) < ALPHA
    assert sjd_state_after_idle(llm) == [[]]


def test_a_wrong_q_under_guidance_fails_the_same_test(llm, exact_guided):
    llm.collective_rpc("sjd_proposer_call", args=("set_fault", "neighbour"))
    try:
        samples = sample(llm)
    finally:
        llm.collective_rpc("sjd_proposer_call", args=("set_fault", None))
    assert chi_square_pvalue(samples, exact_guided) < ALPHA
