"""Classifier-free guidance under SJD samples exactly the guided AR distribution.

As tests/test_lossless.py, with guidance: every request runs as a pair (the
prompt and an unconditional prompt) and the verified distribution is the
guided one, uncond + s * (cond - uncond), after temperature and top-k. The
exact guided distribution comes from teacher forcing both streams with
transformers. Every drafting and initial-draft mode is tested under guidance
(initial drafts "above" under an image layout). A proposer reporting a wrong
q fails the same test.
"""

import pytest
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown, sjd_state_after_idle, spec_counters
from tests.stats import chi_square_pvalue
from vllm_sjd.testing.tiny_llama import exact_continuation_probs
from tests.test_lossless import GRID, LONG_WINDOW, MODES, SHORT_WINDOW
from vllm_sjd.guidance import guidance_extra_args
from vllm_sjd.layouts.constraints import image_extra_args

PROMPT = [7, 12, 30]
UNCONDITIONAL_PROMPT = [40]
SCALE = 3.0
LENGTH = 6
TEMPERATURE = 0.6
TOP_K = 2
NUM_SAMPLES = 8_000
MODE_SAMPLES = 5_000  # per mode below; the known fault is caught in test_lossless.py
WINDOW = 4
ALPHA = 1e-4

pytestmark = pytest.mark.engine


def exact(model, scale: float, grid=None):
    return exact_continuation_probs(
        model, PROMPT, grid.num_tokens if grid else LENGTH, temperature=TEMPERATURE,
        top_k=TOP_K, guidance_scale=scale, unconditional_prompt=UNCONDITIONAL_PROMPT,
        grid=grid,
    )


@pytest.fixture(scope="module")
def exact_guided(contextual_model):
    return exact(contextual_model, SCALE)


@pytest.fixture(scope="module")
def exact_guided_with_layout(contextual_model):
    return exact(contextual_model, SCALE, GRID)


@pytest.fixture(scope="module")
def llm(contextual_model):
    # FaultyQProposer with no fault set drafts and reports q exactly as
    # SJDProposer (it only overrides the window hook to inject a fault).
    engine = make_llm(
        contextual_model,
        sjd={
            "num_speculative_tokens": LONG_WINDOW,
            "initial_drafts": "last_distribution",
            "proposer": "tests.faulty_proposers.FaultyQProposer",
            # Every step verifies the window set_drafting asks for.
            "dynamic_num_speculative_tokens": "off",
        },
        max_num_seqs=256,
    )
    engine.collective_rpc(
        "sjd_proposer_call", args=("set_drafting", "independent", "last_distribution", WINDOW)
    )
    yield engine
    shutdown(engine)


def sample(llm, grid=None, count: int = NUM_SAMPLES) -> list[tuple[int, ...]]:
    extra_args = guidance_extra_args(SCALE, UNCONDITIONAL_PROMPT)
    if grid is not None:
        extra_args.update(image_extra_args(grid))
    length = grid.num_tokens if grid else LENGTH
    params = SamplingParams(
        temperature=TEMPERATURE, top_k=TOP_K, max_tokens=length, min_tokens=length,
        ignore_eos=True, extra_args=extra_args,
    )
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * count, params, use_tqdm=False)
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


@pytest.mark.parametrize("drafting,initial", MODES)
def test_guided_sjd_in_every_drafting_mode_matches_the_guided_distribution(
    llm, exact_guided, exact_guided_with_layout, drafting, initial
):
    # "above" needs an image whose rows are longer than the window; the other
    # modes run with a window longer than the continuation.
    grid = GRID if initial == "above" else None
    llm.collective_rpc(
        "sjd_proposer_call",
        args=("set_drafting", drafting, initial, SHORT_WINDOW if grid else LONG_WINDOW),
    )
    samples = sample(llm, grid, MODE_SAMPLES)
    counts = llm.collective_rpc("sjd_proposer_call", args=("get_counts",))[0]
    assert chi_square_pvalue(samples, exact_guided_with_layout if grid else exact_guided) > ALPHA
    assert (counts["kept"] > 0) == (drafting == "coupled")
    assert (counts["from_above"] > 0) == (initial == "above")


def test_guided_sjd_with_a_window_that_changes_every_step_matches_the_guided_distribution(
    llm, exact_guided
):
    """K cycles through 4, 0, 2, 3, 0, 1 drafts a step, as the dynamic window may
    vary it; K = 0 steps are plain AR steps of both pair members."""
    llm.collective_rpc("sjd_proposer_call", args=("set_drafting", "coupled", "uniform", WINDOW))
    llm.collective_rpc("sjd_proposer_call", args=("set_window_cycle", (4, 0, 2, 3, 0, 1)))
    before = spec_counters(llm)
    try:
        samples = sample(llm, count=MODE_SAMPLES)
    finally:
        llm.collective_rpc("sjd_proposer_call", args=("set_window_cycle", ()))
    after = spec_counters(llm)
    assert after["num_accepted_tokens"] - before.get("num_accepted_tokens", 0) > 0.1 * MODE_SAMPLES
    assert chi_square_pvalue(samples, exact_guided) > ALPHA
