"""A KV cache too small for the batch: SJD requests are preempted and resume intact."""

import pytest
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown, sjd_state_after_idle
from vllm_sjd.testing.tiny_llama import greedy_continuation

pytestmark = pytest.mark.engine

# About 512 tokens of KV for 8 requests of 153 tokens each (float32, 2 layers,
# 2 heads of 32: 1 KiB per token).
KV_BYTES = 512 * 1024


@pytest.fixture(scope="module")
def small_cache_llm(peaked_model):
    with pytest.MonkeyPatch.context() as env:
        env.delenv("VLLM_CPU_KVCACHE_SPACE")  # it would override kv_cache_memory_bytes
        engine = make_llm(
            peaked_model,
            sjd={"num_speculative_tokens": 8},
            kv_cache_memory_bytes=KV_BYTES,
            max_model_len=256,
            max_num_seqs=8,
        )
    yield engine
    shutdown(engine)


def preemptions(llm) -> int:
    return sum(
        m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"
    )


def test_preempted_requests_resume_without_corruption(small_cache_llm, peaked_model):
    prompts = [[4 + i, 20 + i, 9] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=150, min_tokens=150, ignore_eos=True)
    outputs = small_cache_llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    assert preemptions(small_cache_llm) > 0
    for prompt, output in zip(prompts, outputs):
        assert list(output.outputs[0].token_ids) == greedy_continuation(peaked_model, prompt, 150)
    assert sjd_state_after_idle(small_cache_llm) == [[]]
