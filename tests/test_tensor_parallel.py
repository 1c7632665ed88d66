"""Tensor parallel 2 gives the same SJD tokens as tensor parallel 1.

On this CPU: vLLM's default multiprocessing executor, one OMP thread set per
rank (VLLM_CPU_OMP_THREADS_BIND='0|1'). Every rank runs its own proposer; they
must hold the same drafts and the same q.
"""

import pytest
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown

pytestmark = pytest.mark.engine

PROMPTS = [[5, 6, 7], [9, 10, 11, 12], [40, 41], [3, 33, 3, 33]]
PARAMS = [
    SamplingParams(temperature=1.0, seed=11, max_tokens=40, min_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.7, top_k=8, seed=12, max_tokens=33, min_tokens=33, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=25, min_tokens=25, ignore_eos=True),
    SamplingParams(temperature=1.1, top_p=0.8, seed=13, max_tokens=47, min_tokens=47, ignore_eos=True),
]
SJD = {"num_speculative_tokens": 6}


def run(llm) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def rank_windows_mid_flight(llm) -> list[dict]:
    engine = llm.llm_engine
    # An unseeded request too: its drafting key comes from the global
    # generator, which must agree across ranks.
    unseeded = SamplingParams(temperature=1.0, max_tokens=40, min_tokens=40, ignore_eos=True)
    for i, (prompt, params) in enumerate(zip(PROMPTS + [[8, 9]], PARAMS + [unseeded])):
        engine.add_request(f"tp-{i}", {"prompt_token_ids": prompt}, params)
    for _ in range(4):
        engine.step()
    digests = llm.collective_rpc("sjd_proposer_call", args=("window_digest",))
    while engine.has_unfinished_requests():
        engine.step()
    return digests


@pytest.fixture(scope="module")
def tp2(peaked_model):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        llm = make_llm(peaked_model, sjd=SJD, tensor_parallel_size=2)
    tokens = run(llm)
    digests = rank_windows_mid_flight(llm)
    shutdown(llm)
    return tokens, digests


@pytest.fixture(scope="module")
def tp1_tokens(peaked_model):
    llm = make_llm(peaked_model, sjd=SJD)
    tokens = run(llm)
    shutdown(llm)
    return tokens


def test_tp2_ranks_hold_identical_windows(tp2):
    _, digests = tp2
    assert len(digests) == 2
    assert digests[0], "requests were in flight, so windows must exist"
    assert digests[0] == digests[1]


def test_tp2_tokens_equal_tp1_tokens(tp2, tp1_tokens):
    tokens, _ = tp2
    assert [len(t) for t in tokens] == [40, 33, 25, 47]
    assert tokens == tp1_tokens
