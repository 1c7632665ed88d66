"""ZipAR in the real vLLM engine on a tiny Lumina-format Chameleon.

What each token is sampled from is checked against transformers fed exactly
ZipAR's context (the stream so far, each token at its raster position); with
W equal to the row the stream is the raster order and greedy ZipAR is plain
AR. Distributions are checked by chi-square: W equal to the row against AR's
exact distribution, W shorter against ZipAR's own (which AR's must fail).
"""

from collections import Counter
from itertools import product

import pytest
import torch
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown, sjd_state_after_idle
from tests.stats import chi_square_pvalue
from vllm_sjd.config import ZipARConfig
from vllm_sjd.core.zipar import NO_TARGET, raster_tokens, stream_order
from vllm_sjd.image_generation import image_sampling_params
from vllm_sjd.layouts.grid import ImageGrid
from vllm_sjd.testing.tiny_chameleon import FIRST_WORD_ID, VOCAB_SIZE, build_tiny_chameleon
from vllm_sjd.testing.zipar_reference import stream_logits

pytestmark = pytest.mark.engine

WINDOW = 2
MAX_FEEDS = 64  # the default cap (num_speculative_tokens 63)
EOL, EOI = 8803, 8196
# Rows of 2 codes (W = the row: AR) and of 3 (W < the row: rows overlap).
AR_GRID = ImageGrid(32, 32, rows=2, cols=2, header=(), row_end=EOL, trailer=(EOI,),
                    code_low=10, code_high=13)
ZIPAR_GRID = ImageGrid(48, 32, rows=2, cols=3, header=(), row_end=EOL, trailer=(EOI,),
                       code_low=10, code_high=12)
# A larger grid for the greedy checks: 5 rows of 6 codes over 400 codes.
WIDE_GRID = ImageGrid(96, 80, rows=5, cols=6, header=(), row_end=EOL, trailer=(EOI,),
                      code_low=4, code_high=404)
PROMPT = [FIRST_WORD_ID + 3, FIRST_WORD_ID + 7, 8197]
UNCONDITIONAL = [8197]
TEMPERATURE = 2.0  # flattens the tiny model's rows: few outcomes too rare to count
NUM_SAMPLES = 4000
ALPHA = 1e-4
# About 512 tokens of KV (float32, 2 layers, 2 heads of 32: 1 KiB a token):
# 16 images of WIDE_GRID at once do not fit, so some are preempted.
KV_BYTES = 512 * 1024
# A small token budget: long prompts and resumed requests prefill in chunks.
TOKEN_BUDGET = 64


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
    return build_tiny_chameleon(tmp_path_factory.mktemp("zipar"), sharpness=3.0)


@pytest.fixture(scope="module")
def llm(chameleon):
    with pytest.MonkeyPatch.context() as env:
        env.delenv("VLLM_CPU_KVCACHE_SPACE")  # it would override kv_cache_memory_bytes
        engine = make_llm(
            chameleon,
            speculative_config={"method": "zipar", "window": WINDOW},
            kv_cache_memory_bytes=KV_BYTES,
            max_model_len=256,
            max_num_seqs=32,
            max_num_batched_tokens=TOKEN_BUDGET,
        )
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def transformers_model(chameleon):
    from transformers import ChameleonForConditionalGeneration

    return ChameleonForConditionalGeneration.from_pretrained(chameleon, dtype=torch.float32).eval()


def order_of(grid):
    return ZipARConfig(window=WINDOW).order_for(grid)


def params(grid, **kwargs) -> SamplingParams:
    p = image_sampling_params(grid, **kwargs)
    p.max_tokens = order_of(grid).num_tokens
    return p


def sampled_rows(order):
    """(logits row, raster target) of every token ZipAR samples."""
    rows = [] if order.first_target == NO_TARGET else [(0, order.first_target)]
    return rows + [(k + 1, t) for k, t in enumerate(order.targets) if t != NO_TARGET]


def guided_logits(model, grid, order, stream, scale, prompt=PROMPT):
    positions = order.positions[: len(stream)]
    logits = stream_logits(model, prompt, stream, positions)
    if scale != 1.0:
        uncond = stream_logits(model, UNCONDITIONAL, stream, positions)
        logits = uncond + scale * (logits - uncond)
    return logits


LONG_PROMPT = [FIRST_WORD_ID + i % 9 for i in range(100)] + [8197]  # prefilled in chunks


@pytest.mark.parametrize("grid", [AR_GRID, WIDE_GRID], ids=["row-is-W", "rows-overlap"])
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["unguided", "guided"])
@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT], ids=["short", "chunked"])
def test_greedy_tokens_are_the_argmax_of_zipar_context(llm, transformers_model, grid, scale, prompt):
    order = order_of(grid)
    out = llm.generate(
        {"prompt_token_ids": prompt},
        params(grid, temperature=0, guidance_scale=scale, unconditional_prompt_token_ids=UNCONDITIONAL),
        use_tqdm=False,
    )[0]
    stream = list(out.outputs[0].token_ids)
    assert len(stream) == order.num_tokens
    raster = raster_tokens(stream, order, grid)
    grid.codes(raster)  # follows the layout
    logits = guided_logits(transformers_model, grid, order, stream, scale, prompt)
    allowed = grid.allowed_mask(torch.arange(grid.num_tokens), logits.shape[-1])
    rows = sampled_rows(order)
    expected = [int(logits[r].masked_fill(~allowed[t], float("-inf")).argmax()) for r, t in rows]
    assert [raster[t] for _, t in rows] == expected
    if grid.cols <= WINDOW:
        assert list(order.positions) == list(range(grid.num_tokens))  # plain AR
    else:
        # The same tokens read in raster order with raster positions (AR's
        # context) predict other tokens: the check above sees the context.
        ar_logits = guided_logits(transformers_model, grid, stream_order(grid, grid.cols, MAX_FEEDS),
                                  raster[:-1], scale, prompt)
        ar = [int(ar_logits[t].masked_fill(~allowed[t], float("-inf")).argmax()) for _, t in rows]
        assert ar != expected


def exact_distribution(model, grid, order) -> dict[tuple[int, ...], float]:
    """Probability of every code grid when each target is drawn from its row of
    ZipAR's context (temperature TEMPERATURE, the layout's mask)."""
    allowed = grid.allowed_mask(torch.arange(grid.num_tokens), VOCAB_SIZE)
    rows = sampled_rows(order)
    cells = [t for _, t in rows]
    probs = {}
    for codes in product(range(grid.code_low, grid.code_high), repeat=len(cells)):
        raster = grid.constraints(torch.arange(grid.num_tokens))[0].tolist()
        for t, c in zip(cells, codes):
            raster[t] = c
        stream = [raster[p] for p in order.positions]
        logits = guided_logits(model, grid, order, stream[:-1], 1.0) / TEMPERATURE
        p = 1.0
        for (r, t), c in zip(rows, codes):
            row = torch.softmax(logits[r].masked_fill(~allowed[t], float("-inf")), dim=-1)
            p *= float(row[c])
        probs[tuple(raster[t] for t in sorted(cells))] = p
    assert abs(sum(probs.values()) - 1.0) < 1e-9
    return probs


def sample_images(llm, grid) -> Counter:
    order = order_of(grid)
    outs = llm.generate(
        [{"prompt_token_ids": PROMPT}] * NUM_SAMPLES,
        params(grid, temperature=TEMPERATURE),
        use_tqdm=False,
    )
    counts = Counter()
    for out in outs:
        raster = raster_tokens(out.outputs[0].token_ids, order, grid)
        counts[tuple(grid.codes(raster).flatten().tolist())] += 1
    return counts


def test_w_equal_to_the_row_samples_ar_distribution(llm, transformers_model):
    exact_ar = exact_distribution(transformers_model, AR_GRID, order_of(AR_GRID))
    assert chi_square_pvalue(sample_images(llm, AR_GRID), exact_ar) > ALPHA


def test_overlapping_rows_sample_zipar_distribution_not_ar(llm, transformers_model):
    counts = sample_images(llm, ZIPAR_GRID)
    own = exact_distribution(transformers_model, ZIPAR_GRID, order_of(ZIPAR_GRID))
    raster = stream_order(ZIPAR_GRID, ZIPAR_GRID.cols, MAX_FEEDS)
    exact_ar = exact_distribution(transformers_model, ZIPAR_GRID, raster)
    assert chi_square_pvalue(counts, own) > ALPHA
    assert chi_square_pvalue(counts, exact_ar) < ALPHA  # ZipAR is lossy, and the test sees it


def preemptions(llm) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_seeded_images_survive_preemption_and_batching(llm):
    """A seeded image is the same alone, in a batch that preempts requests, and
    guided beside unguided ones; its tokens come back in raster order."""
    seeded = params(WIDE_GRID, temperature=1.0, seed=11)
    alone = llm.generate({"prompt_token_ids": PROMPT}, seeded, use_tqdm=False)[0]
    before = preemptions(llm)
    others = [params(WIDE_GRID, temperature=1.0, seed=100 + i, guidance_scale=2.0 if i % 2 else 1.0,
                     unconditional_prompt_token_ids=UNCONDITIONAL) for i in range(15)]
    outs = llm.generate(
        [{"prompt_token_ids": PROMPT}] * 16, [*others[:7], seeded, *others[7:]], use_tqdm=False
    )
    assert preemptions(llm) > before
    assert list(outs[7].outputs[0].token_ids) == list(alone.outputs[0].token_ids)
    order = order_of(WIDE_GRID)
    for out in outs:
        WIDE_GRID.codes(raster_tokens(out.outputs[0].token_ids, order, WIDE_GRID))
    assert sjd_state_after_idle(llm) == [[]]


def test_bad_settings_stop_the_engine_naming_them(chameleon, peaked_model):
    from vllm_sjd.config import SJDConfigError

    cases = [
        (chameleon, {"window": 0}, "window"),
        (chameleon, {"window": 10_000}, "beyond the row"),
        (chameleon, {"window": 4, "drafting": "coupled"}, "drafting"),
        (peaked_model, {"window": 4}, "no image layout"),
    ]
    for model, settings, named in cases:
        with pytest.raises(SJDConfigError, match=named):
            make_llm(model, speculative_config={"method": "zipar", **settings})


def test_tensor_parallel_2_gives_tensor_parallel_1s_images(llm, chameleon):
    """Every rank draws the same tokens and keeps the same stream (counter-based
    numbers; unseeded keys from the generator vLLM seeds alike on each rank)."""
    requests = [params(WIDE_GRID, temperature=0),
                params(WIDE_GRID, temperature=1.0, seed=3, guidance_scale=3.0,
                       unconditional_prompt_token_ids=UNCONDITIONAL)]
    prompts = [{"prompt_token_ids": PROMPT}] * 2
    tp1 = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, requests, use_tqdm=False)]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core set per rank
        tp2_engine = make_llm(chameleon, speculative_config={"method": "zipar", "window": WINDOW},
                              tensor_parallel_size=2, max_model_len=256)
    try:
        outs = tp2_engine.generate(prompts, requests, use_tqdm=False)
    finally:
        shutdown(tp2_engine)
    assert [list(o.outputs[0].token_ids) for o in outs] == tp1
