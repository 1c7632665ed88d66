"""SJD2 (`{"method": "sjd2"}`, vllm_sjd/sjd2.py) through the real engine, on a tiny Chameleon
made to look fine-tuned (a random timestep table and the "sjd2" config entry).

Verified drafts are exact samples of their q whatever the noisy slots hold, so
SJD2 samples the (fine-tuned) model's own AR distribution: checked by
chi-square against teacher forcing, with denoising off (clean drafts only:
SJD's window) and on; a q off by one slot fails the same test. The model receives, at each noisy slot, the embedding
and level the proposer planned; a seeded image is the same in any batch;
checkpoints that were not fine-tuned, or not of the Chameleon family, are
refused at start-up.
"""

import pytest
import torch
from safetensors.torch import load_file
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown, sjd_state_after_idle, spec_counters
from tests.stats import chi_square_pvalue
from vllm_sjd.config import SJDConfigError, split_sjd2_config
from vllm_sjd.core.denoising import TIMESTEP_WEIGHT
from vllm_sjd.image_generation import image_sampling_params
from vllm_sjd.layouts.constraints import image_extra_args
from vllm_sjd.layouts.grid import ImageGrid
from vllm_sjd.testing.tiny_chameleon import add_sjd2_timesteps, build_tiny_chameleon
from vllm_sjd.testing.tiny_llama import exact_continuation_probs

PROMPT = [7, 12, 30]
LENGTH = 6
TEMPERATURE = 1.0
TOP_K = 2  # 2**6 = 64 outcomes
NUM_SAMPLES = 10_000
WINDOW = 4
ALPHA = 1e-4  # sampling noise alone falls below this once in 10^4 runs
# A toy image in the Chameleon image-code range: 4 rows of 6 codes.
GRID = ImageGrid(width=64, height=64, rows=4, cols=6, header=(8197,), row_end=8803,
                 trailer=(8196,), code_low=4, code_high=8196)

pytestmark = pytest.mark.engine


def sjd2(**settings) -> dict:
    return {"method": "sjd2", "num_speculative_tokens": WINDOW, **settings}


@pytest.fixture(scope="module")
def tuned_model(tmp_path_factory):
    path = build_tiny_chameleon(tmp_path_factory.mktemp("sjd2-chameleon"), seed=3)
    return add_sjd2_timesteps(path, noise_levels=4)


@pytest.fixture(scope="module")
def exact(tuned_model):
    return exact_continuation_probs(tuned_model, PROMPT, LENGTH, temperature=TEMPERATURE, top_k=TOP_K,
                                    chameleon=True)


def sample(llm, count: int = NUM_SAMPLES) -> list[tuple[int, ...]]:
    params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_tokens=LENGTH, min_tokens=LENGTH,
                            ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * count, params, use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def denoising_llm(tuned_model):
    # SJD2's proposer with a fault that stays off but for the test that shows it.
    llm = make_llm(tuned_model, sjd=None, max_num_seqs=256, speculative_config=sjd2(
        denoising_steps=2, proposer="tests.faulty_proposers.FaultySJD2Proposer"))
    yield llm
    shutdown(llm)


def test_sjd2_with_denoising_off_samples_the_model_exactly(tuned_model, exact):
    # Clean drafts only: SJD's window on the fine-tuned model, through SJD2's proposer.
    llm = make_llm(tuned_model, sjd=None, speculative_config=sjd2(denoising=False), max_num_seqs=256)
    try:
        samples = sample(llm)
        counters = spec_counters(llm)
    finally:
        shutdown(llm)
    assert counters["num_accepted_tokens"] > 0.1 * NUM_SAMPLES
    assert chi_square_pvalue(samples, exact) > ALPHA


def test_sjd2_with_noisy_slots_samples_the_model_exactly(denoising_llm, exact):
    samples = sample(denoising_llm)
    counters = spec_counters(denoising_llm)
    assert counters["num_accepted_tokens"] > 0.1 * NUM_SAMPLES
    assert chi_square_pvalue(samples, exact) > ALPHA


def test_a_q_off_by_one_slot_fails_the_same_test(denoising_llm, exact):
    denoising_llm.collective_rpc("sjd_proposer_call", args=("set_fault", True))
    try:
        samples = sample(denoising_llm)
    finally:
        denoising_llm.collective_rpc("sjd_proposer_call", args=("set_fault", False))
    assert chi_square_pvalue(samples, exact) < ALPHA


def test_the_model_reads_the_embeddings_the_proposer_planned(denoising_llm, tuned_model):
    table = load_file(str(tuned_model / "sjd2-timesteps.safetensors"))[TIMESTEP_WEIGHT]
    params = SamplingParams(temperature=1.0, max_tokens=10, min_tokens=10, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": list(range(40, 80))}]  # apart
    denoising_llm.collective_rpc("sjd2_feed_log", args=("start",))
    denoising_llm.generate(prompts, params, use_tqdm=False)
    logs = denoising_llm.collective_rpc("sjd2_feed_log", args=("stop",))[0]
    planned: dict[int, dict[int, tuple]] = {}  # call -> position -> (level, embedding)
    for entry in logs["planned"]:
        for p, level, x in zip(entry["positions"], entry["levels"], torch.tensor(entry["embeds"])):
            planned.setdefault(entry["call"], {})[p] = (level, x)
    calls = sorted(planned)
    assert len(calls) >= 5 and len(logs["received"]) >= len(calls) - 2
    last = -1
    received = [{k: torch.tensor(v) for k, v in fed.items()} for fed in logs["received"]]
    for fed in received:
        # The inputs are the embeddings plus their levels' timestep vectors.
        torch.testing.assert_close(fed["inputs"], fed["embeds"] + table[fed["levels"]])
        # ... and a later step's plan holds every one of them, at that position and level.
        rows = list(zip(fed["positions"].tolist(), fed["levels"].tolist(), fed["embeds"]))
        match = next(c for c in calls if c > last and all(
            p in planned[c] and planned[c][p][0] == level and torch.equal(planned[c][p][1], x)
            for p, level, x in rows))
        last = match
    levels = torch.cat([fed["levels"] for fed in received])
    assert (levels > 0).all() and levels.max() == 4  # noisy only, pure noise at the back


def test_a_seeded_sjd2_image_is_the_same_in_any_batch(denoising_llm):
    seeded = SamplingParams(temperature=1.0, seed=99, max_tokens=GRID.num_tokens, min_tokens=GRID.num_tokens,
                            ignore_eos=True, extra_args=image_extra_args(GRID))
    target = {"prompt_token_ids": PROMPT}
    alone = denoising_llm.generate([target], seeded, use_tqdm=False)[0].outputs[0].token_ids
    crowd = [{"prompt_token_ids": p} for p in ([5, 6], [40, 41, 42], [3])]
    others = [SamplingParams(temperature=0.8, max_tokens=n, ignore_eos=True) for n in (9, 30, 17)]
    mixed = denoising_llm.generate(crowd[:1] + [target] + crowd[1:], others[:1] + [seeded] + others[1:],
                                   use_tqdm=False)
    assert list(mixed[1].outputs[0].token_ids) == list(alone)
    assert GRID.codes(alone).shape == (GRID.rows, GRID.cols)


def test_a_guided_sjd2_image_comes_whole(denoising_llm):
    params = image_sampling_params(GRID, seed=5, guidance_scale=3.0, unconditional_prompt_token_ids=[8, 9])
    before = spec_counters(denoising_llm)["num_drafts"]
    out = denoising_llm.generate([{"prompt_token_ids": PROMPT}] * 3, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == GRID.num_tokens for o in out)
    assert spec_counters(denoising_llm)["num_drafts"] > before


def test_preempted_sjd2_requests_resume_intact(tuned_model, denoising_llm, monkeypatch):
    prompts = [{"prompt_token_ids": [4 + i, 20 + i, 9]} for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=150, min_tokens=150, ignore_eos=True)
    # The reference: the same engine settings with room for every request.
    expected = [list(o.outputs[0].token_ids) for o in denoising_llm.generate(prompts, params, use_tqdm=False)]
    # About 512 tokens of KV for 8 requests of 153 (float32, 2 layers, 2 heads of 32: 1 KiB a token).
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    llm = make_llm(tuned_model, speculative_config=sjd2(num_speculative_tokens=8),
                   kv_cache_memory_bytes=512 * 1024, max_model_len=256, max_num_seqs=8)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions") > 0
        assert sjd_state_after_idle(llm) == [[]]
    finally:
        shutdown(llm)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


def test_a_checkpoint_that_was_not_fine_tuned_is_refused(tmp_path, contextual_model):
    plain = build_tiny_chameleon(tmp_path / "plain")
    with pytest.raises(SJDConfigError, match="fine-tuned"):
        make_llm(plain, speculative_config=sjd2())
    with pytest.raises(SJDConfigError, match="Chameleon-family"):
        make_llm(contextual_model, speculative_config=sjd2())


def test_sjd2_settings_are_checked():
    vllm_spec, sjd, settings = split_sjd2_config(sjd2(denoising_steps=3))
    assert vllm_spec["num_speculative_tokens"] == WINDOW and vllm_spec["method"] == "custom_class"
    assert settings.denoising_steps == 3 and sjd.dynamic_num_speculative_tokens == "off"
    with pytest.raises(SJDConfigError, match="SJD2 accepts .*denoising_steps"):
        split_sjd2_config(sjd2(drafting="coupled"))
    with pytest.raises(SJDConfigError, match="denoising_steps"):
        split_sjd2_config(sjd2(denoising_steps=0))
