"""SJD samples exactly the AR distribution, and the test would notice if not.

Many short continuations are sampled through the real engine with SJD and
compared, by Pearson's chi-square at a fixed seed, with the exact AR
distribution of the same weights (teacher forcing with transformers, same
temperature and top-k). Every drafting mode and initial-draft mode is tested,
with a window longer than the continuation and, under an image layout, one
shorter than an image row (so fresh slots have committed cells above). A
proposer that reports a wrong q must fail the same test.
"""

import pytest
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown, spec_counters
from tests.stats import chi_square_pvalue
from vllm_sjd.testing.tiny_llama import exact_continuation_probs
from vllm_sjd.layouts.constraints import image_extra_args
from vllm_sjd.layouts.grid import ImageGrid

PROMPT = [7, 12, 30]
LENGTH = 6
TEMPERATURE = 0.6
TOP_K = 2  # 2**6 = 64 outcomes
NUM_SAMPLES = 10_000
WINDOW = 4  # shorter than LENGTH: several verify steps, recycled drafts used
LONG_WINDOW = 8  # longer than the continuation and the whole toy image
SHORT_WINDOW = 2  # shorter than an image row of GRID (3 tokens)
MODES = [
    (drafting, initial)
    for drafting in ("independent", "coupled", "gumbel")
    for initial in ("uniform", "last_distribution", "above")
]
# Sampling noise alone falls below this once in 10^4 runs; a fault goes far below.
ALPHA = 1e-4

pytestmark = pytest.mark.engine


# A toy image layout on the 64-token vocabulary: start token, 2 rows of 2 codes
# from [10, 30) each closed by end-of-line, end token: 8 tokens, 4 of them free.
GRID = ImageGrid(width=32, height=32, rows=2, cols=2, header=(5,), row_end=7,
                 trailer=(9,), code_low=10, code_high=30)


@pytest.fixture(scope="module")
def exact(contextual_model):
    return exact_continuation_probs(
        contextual_model, PROMPT, LENGTH, temperature=TEMPERATURE, top_k=TOP_K
    )


@pytest.fixture(scope="module")
def exact_with_layout(contextual_model):
    return exact_continuation_probs(
        contextual_model, PROMPT, GRID.num_tokens, temperature=TEMPERATURE, top_k=TOP_K,
        grid=GRID,
    )


def sample(
    llm, grid: ImageGrid | None = None, count: int = NUM_SAMPLES
) -> list[tuple[int, ...]]:
    length = grid.num_tokens if grid else LENGTH
    params = SamplingParams(
        temperature=TEMPERATURE, top_k=TOP_K, max_tokens=length, min_tokens=length,
        ignore_eos=True, extra_args=image_extra_args(grid) if grid else None,
    )
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * count, params, use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module", params=["uniform", "last_distribution"])
def sjd_samples(request, contextual_model):
    llm = make_llm(
        contextual_model,
        sjd={"num_speculative_tokens": WINDOW, "initial_drafts": request.param,
             "dynamic_num_speculative_tokens": "off"},
        max_num_seqs=256,
    )
    samples = sample(llm)
    counters = spec_counters(llm)
    steps = sampling_steps(llm)
    with_layout = sample(llm, GRID)
    steps_with_layout = sampling_steps(llm)
    shutdown(llm)
    return samples, counters, with_layout, steps, steps_with_layout


def sampling_steps(llm) -> dict[str, int]:
    return llm.collective_rpc("sjd_sampling_steps")[0]


def test_sjd_matches_exact_ar_distribution(sjd_samples, exact):
    samples, counters, _, steps, _ = sjd_samples
    assert all(len(s) == LENGTH for s in samples)
    # Drafts were verified and some accepted, so the test exercises SJD.
    assert counters["num_drafts"] > NUM_SAMPLES
    assert counters["num_accepted_tokens"] > 0.1 * NUM_SAMPLES
    # By SJD's own step (patches/sjd_sampling.py), on the whole vocabulary.
    assert steps["vocabulary"] > 0 and steps["columns"] == steps["vllm"] == 0
    assert chi_square_pvalue(samples, exact) > ALPHA


def test_sjd_under_an_image_layout_matches_the_masked_ar_distribution(
    sjd_samples, exact_with_layout
):
    _, _, samples, before, after = sjd_samples
    # Image requests alone: every step on the layout's columns.
    assert after["columns"] > 0 and after["vocabulary"] == before["vocabulary"]
    assert after["vllm"] == 0
    assert GRID.num_tokens == 8
    assert all(s[0] == 5 and s[3] == 7 and s[6] == 7 and s[7] == 9 for s in samples)
    assert chi_square_pvalue(samples, exact_with_layout) > ALPHA


def test_sjd_with_a_window_that_changes_every_step_matches_exact_ar(contextual_model, exact):
    # K cycles through 4, 0, 2, 3, 0, 1 drafts a step (K = 0: a plain AR step).
    llm = make_llm(
        contextual_model,
        sjd={"num_speculative_tokens": WINDOW, "proposer": "tests.faulty_proposers.VaryingWindowProposer",
             "dynamic_num_speculative_tokens": "off"},
        max_num_seqs=256,
    )
    try:
        samples = sample(llm)
        counters = spec_counters(llm)
    finally:
        shutdown(llm)
    assert counters["num_accepted_tokens"] > 0.1 * NUM_SAMPLES
    assert chi_square_pvalue(samples, exact) > ALPHA


@pytest.fixture(scope="module")
def faulty_llm(contextual_model):
    # FaultyQProposer without a fault drafts exactly as SJDProposer; its modes
    # and window length switch between tests (set_drafting).
    llm = make_llm(
        contextual_model,
        sjd={
            "num_speculative_tokens": LONG_WINDOW,
            "proposer": "tests.faulty_proposers.FaultyQProposer",
            # Every step verifies the window set_drafting asks for.
            "dynamic_num_speculative_tokens": "off",
        },
        max_num_seqs=256,
    )
    yield llm
    shutdown(llm)


def set_drafting(llm, drafting: str, initial: str, num_slots: int) -> None:
    llm.collective_rpc("sjd_proposer_call", args=("set_drafting", drafting, initial, num_slots))


def proposer_counts(llm) -> dict[str, int]:
    return llm.collective_rpc("sjd_proposer_call", args=("get_counts",))[0]


def sample_with_fault(llm, fault: str, count: int = NUM_SAMPLES):
    llm.collective_rpc("sjd_proposer_call", args=("set_fault", fault, TEMPERATURE))
    try:
        return sample(llm, count=count)
    finally:
        llm.collective_rpc("sjd_proposer_call", args=("set_fault", None))


@pytest.mark.parametrize("fault", ["neighbour", "before_temperature"])
def test_wrong_q_fails_the_same_test(faulty_llm, exact, fault):
    set_drafting(faulty_llm, "independent", "last_distribution", WINDOW)
    assert chi_square_pvalue(sample_with_fault(faulty_llm, fault), exact) < ALPHA


@pytest.mark.parametrize("drafting,initial", MODES)
def test_every_drafting_mode_matches_exact_ar(
    faulty_llm, exact, exact_with_layout, drafting, initial
):
    set_drafting(faulty_llm, drafting, initial, LONG_WINDOW)
    samples = sample(faulty_llm)
    long_counts = proposer_counts(faulty_llm)
    set_drafting(faulty_llm, drafting, initial, SHORT_WINDOW)
    with_layout = sample(faulty_llm, GRID)
    short_counts = proposer_counts(faulty_llm)
    assert chi_square_pvalue(samples, exact) > ALPHA
    assert chi_square_pvalue(with_layout, exact_with_layout) > ALPHA
    # The mode under test did its part.
    if drafting == "coupled":
        assert long_counts["kept"] > 0.1 * NUM_SAMPLES
    else:
        assert long_counts["kept"] == 0
    if initial == "above":
        assert short_counts["from_above"] > 0.1 * NUM_SAMPLES
    else:
        assert short_counts["from_above"] == 0


def test_a_kept_draft_reporting_its_old_q_fails_the_same_test(faulty_llm, exact):
    # The public SCD code's bug: a draft the coupling kept reports the q it was
    # first drawn from. The bias is small where that q is close to the new row,
    # so this test drafts fresh slots from the newest row (a neighbouring
    # position's distribution) and samples 4x as many continuations.
    set_drafting(faulty_llm, "coupled", "last_distribution", LONG_WINDOW)
    samples = sample_with_fault(faulty_llm, "old_q_for_kept", count=4 * NUM_SAMPLES)
    assert proposer_counts(faulty_llm)["kept"] > NUM_SAMPLES
    assert chi_square_pvalue(samples, exact) < ALPHA


@pytest.mark.parametrize("drafting,initial", [("coupled", "above"), ("gumbel", "above")])
def test_a_seeded_request_gives_the_same_tokens_in_any_batch(faulty_llm, drafting, initial):
    # The coupling's and the Gumbel noise's numbers are counter-based too.
    set_drafting(faulty_llm, drafting, initial, LONG_WINDOW)
    grid = ImageGrid(width=64, height=64, rows=4, cols=6, header=(5,), row_end=7,
                     trailer=(9,), code_low=10, code_high=30)
    seeded = SamplingParams(temperature=1.0, seed=99, max_tokens=grid.num_tokens,
                            min_tokens=grid.num_tokens, ignore_eos=True,
                            extra_args=image_extra_args(grid))
    target = {"prompt_token_ids": PROMPT}
    alone = faulty_llm.generate([target], seeded, use_tqdm=False)[0].outputs[0].token_ids
    crowd = [{"prompt_token_ids": p} for p in ([5, 6], [40, 41, 42], [3])]
    others = [SamplingParams(temperature=0.8, max_tokens=n, ignore_eos=True) for n in (9, 30, 17)]
    mixed = faulty_llm.generate(crowd[:1] + [target] + crowd[1:], others[:1] + [seeded] + others[1:],
                                use_tqdm=False)
    assert list(mixed[1].outputs[0].token_ids) == list(alone)
    counts = proposer_counts(faulty_llm)
    assert counts["from_above"] > 0
    assert (counts["kept"] > 0) == (drafting == "coupled")
