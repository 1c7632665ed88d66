"""SJD with a row lookahead (core/row_lookahead.py) in the real engine, on a tiny Chameleon.

The lookahead feeds tokens one image row below the window at their raster
positions and keeps what the model predicts there as the q of those cells'
initial drafts. Checked: what it keeps is transformers' distribution for
exactly the context it fed (so the positions are right); greedy images are
AR's; sampled images follow AR's exact distribution (chi-square); a fresh
slot drafted as the prediction's most likely token instead of a sample of it
fails the same test; bad settings stop the engine.
"""

from collections import Counter

import pytest
import torch

from tests.conftest import make_llm, shutdown, sjd_state_after_idle
from tests.stats import chi_square_pvalue
# The tiny Chameleon's prompts and grids as the ZipAR tests use them: WIDE_GRID's rows
# of 6 codes over 400 codes for the greedy checks, ZIPAR_GRID's 2 rows of 3 codes
# of 2 values (64 images) for the chi-square test.
from tests.test_zipar import (
    ALPHA, NUM_SAMPLES, PROMPT, TEMPERATURE, UNCONDITIONAL, WIDE_GRID, exact_distribution,
)
from tests.test_zipar import ZIPAR_GRID as SMALL_GRID
from vllm_sjd import demo
from vllm_sjd.core.zipar import stream_order
from vllm_sjd.image_generation import image_sampling_params
from vllm_sjd.testing.tiny_chameleon import VOCAB_SIZE, build_tiny_chameleon
from vllm_sjd.testing.zipar_reference import stream_logits

pytestmark = pytest.mark.engine

WINDOW, LOOKAHEAD = 3, 2
SMALL_WINDOW = 2  # shorter than SMALL_GRID's row: the window's last draft reaches column 2


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
    return build_tiny_chameleon(tmp_path_factory.mktemp("lookahead"), sharpness=3.0)


@pytest.fixture(scope="module")
def llm(chameleon):
    engine = make_llm(
        chameleon,
        sjd={"num_speculative_tokens": WINDOW, "row_lookahead": LOOKAHEAD,
             "proposer": "tests.faulty_proposers.FaultyQProposer",
             "dynamic_num_speculative_tokens": "off"},
        max_model_len=256,
        max_num_seqs=256,
    )
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def transformers_model(chameleon):
    from transformers import ChameleonForConditionalGeneration

    return ChameleonForConditionalGeneration.from_pretrained(chameleon, dtype=torch.float32).eval()


def proposer_call(llm, method, *args):
    return llm.collective_rpc("sjd_proposer_call", args=(method, *args))[0]


def raster_logits(model, prompt, tokens) -> torch.Tensor:
    return stream_logits(model, prompt, tokens, range(len(tokens)))


@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["unguided", "guided"])
def test_greedy_images_are_ar_and_use_the_predictions(llm, transformers_model, scale):
    proposer_call(llm, "set_drafting", "coupled", "above", WINDOW)
    out = llm.generate(
        {"prompt_token_ids": PROMPT},
        image_sampling_params(WIDE_GRID, temperature=0, guidance_scale=scale,
                              unconditional_prompt_token_ids=UNCONDITIONAL),
        use_tqdm=False,
    )[0]
    tokens = list(out.outputs[0].token_ids)
    allowed = WIDE_GRID.allowed_mask(torch.arange(WIDE_GRID.num_tokens), VOCAB_SIZE)
    logits = raster_logits(transformers_model, PROMPT, tokens[:-1])
    if scale != 1.0:
        uncond = raster_logits(transformers_model, UNCONDITIONAL, tokens[:-1])
        logits = uncond + scale * (logits - uncond)
    expected = [int(logits[t].masked_fill(~allowed[t], float("-inf")).argmax())
                for t in range(WIDE_GRID.num_tokens)]
    assert tokens == expected
    assert proposer_call(llm, "get_counts")["from_prediction"] > 0


def test_a_prediction_is_the_model_row_for_the_fed_context(llm, transformers_model):
    """The kept row of a lookahead cell equals transformers' row after the context the
    step fed: committed tokens, the window's drafts, the lookahead's tokens at their
    raster positions (causal over the feed)."""
    proposer_call(llm, "set_drafting", "coupled", "above", WINDOW)
    proposer_call(llm, "record_feeds", True)
    try:
        llm.generate({"prompt_token_ids": PROMPT},
                     image_sampling_params(WIDE_GRID, temperature=1.0, seed=5), use_tqdm=False)
        feeds = proposer_call(llm, "get_feeds")
    finally:
        proposer_call(llm, "record_feeds", False)
    allowed = WIDE_GRID.allowed_mask(torch.arange(WIDE_GRID.num_tokens), VOCAB_SIZE)
    checked = 0
    for feed in feeds:
        committed, drafts, cells, fed, rows = feed
        if not len(rows):
            continue
        generated = committed[len(PROMPT):]
        tokens = generated + drafts + fed
        positions = list(range(len(generated) + len(drafts))) + [c - 1 - len(PROMPT) for c in cells]
        logits = stream_logits(transformers_model, PROMPT, tokens, positions)
        for j, cell in enumerate(cells):
            row = logits[len(generated) + len(drafts) + j + 1]
            expected = torch.softmax(row.masked_fill(~allowed[cell - len(PROMPT)], float("-inf")), -1)
            torch.testing.assert_close(torch.as_tensor(rows[j], dtype=torch.float64), expected,
                                       atol=1e-4, rtol=1e-3)
            checked += 1
    assert checked >= 10
    assert sjd_state_after_idle(llm) == [[]]


def sample_grids(llm, count=NUM_SAMPLES) -> Counter:
    outs = llm.generate(
        [{"prompt_token_ids": PROMPT}] * count,
        image_sampling_params(SMALL_GRID, temperature=TEMPERATURE),
        use_tqdm=False,
    )
    return Counter(tuple(SMALL_GRID.codes(o.outputs[0].token_ids).flatten().tolist()) for o in outs)


@pytest.fixture(scope="module")
def exact_ar(transformers_model):
    raster = stream_order(SMALL_GRID, SMALL_GRID.cols, 64)
    return exact_distribution(transformers_model, SMALL_GRID, raster)


@pytest.mark.parametrize("drafting", ["coupled", "independent"])
def test_sampled_images_follow_ar_distribution(llm, exact_ar, drafting):
    proposer_call(llm, "set_drafting", drafting, "above", SMALL_WINDOW)
    counts = sample_grids(llm)
    assert proposer_call(llm, "get_counts")["from_prediction"] > 0.1 * NUM_SAMPLES
    assert chi_square_pvalue(counts, exact_ar) > ALPHA


def test_drafting_the_predictions_most_likely_token_fails_the_same_test(llm, exact_ar):
    proposer_call(llm, "set_drafting", "independent", "above", SMALL_WINDOW)
    proposer_call(llm, "set_fault", "prediction_argmax")
    try:
        counts = sample_grids(llm)
    finally:
        proposer_call(llm, "set_fault", None)
    assert chi_square_pvalue(counts, exact_ar) < ALPHA


def test_bad_settings_stop_the_engine_naming_them(chameleon, peaked_model):
    from vllm_sjd.config import SJDConfigError

    cases = [
        (chameleon, {"row_lookahead": -1}, "row_lookahead"),
        (demo.MODEL_PATH, {"row_lookahead": 33}, "beyond the row"),  # widest: 32 codes
        (peaked_model, {"row_lookahead": 2}, "no image layout"),
        (chameleon, {"row_lookahead": 2,
                     "num_speculative_tokens_per_batch_size": [[1, 256, 4]]}, "per_batch_size"),
    ]
    for model, settings, named in cases:
        with pytest.raises(SJDConfigError, match=named):
            make_llm(model, sjd=settings)


def test_a_seeded_image_is_the_same_alone_and_in_a_batch(llm):
    """The lookahead's rows depend only on the request's own feed: a seeded image
    does not depend on its neighbours (guided and unguided, other sizes)."""
    proposer_call(llm, "set_drafting", "coupled", "above", WINDOW)
    seeded = image_sampling_params(WIDE_GRID, temperature=1.0, seed=21)
    alone = llm.generate({"prompt_token_ids": PROMPT}, seeded, use_tqdm=False)[0]
    others = [image_sampling_params(WIDE_GRID if i % 2 else SMALL_GRID, temperature=1.0,
                                    guidance_scale=2.0 if i % 3 else 1.0,
                                    unconditional_prompt_token_ids=UNCONDITIONAL)
              for i in range(7)]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 8, [*others[:3], seeded, *others[3:]],
                        use_tqdm=False)
    assert list(outs[3].outputs[0].token_ids) == list(alone.outputs[0].token_ids)
    assert proposer_call(llm, "get_counts")["from_prediction"] > 0
