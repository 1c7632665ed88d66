"""Shared fixtures: tiny checkpoints and the environment vLLM's CPU build needs.

Engines are expensive (about 20 s to start), so each test module builds the
ones it needs once (module-scoped fixtures) and tears them down at its end.
"""

import gc
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Before vLLM is imported: small KV caches, and the test helpers importable in
# vLLM's engine and worker processes (faulty proposers live in tests/).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
)
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from vllm_sjd.testing.tiny_llama import build_tiny_llama  # noqa: E402

# A context-insensitive, peaked model: Jacobi drafts get accepted.
PEAKED = dict(preference=2.0, sharpness=1.0, seed=0)
# A context-dependent model for distribution tests: neighbouring positions have
# different distributions, so a q from the wrong slot is visibly wrong.
CONTEXTUAL = dict(preference=0.0, sharpness=2.0, seed=1)


@pytest.fixture(scope="session")
def peaked_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("peaked"), **PEAKED)


@pytest.fixture(scope="session")
def contextual_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("contextual"), **CONTEXTUAL)


def make_llm(model: Path, *, sjd: dict | None = None, **kwargs):
    """A real vLLM engine on a tiny model; `sjd` is the speculative config."""
    from vllm import LLM

    options = dict(
        model=str(model),
        enforce_eager=True,
        dtype="float32",
        max_model_len=512,
        disable_log_stats=False,
        seed=0,
    )
    if sjd is not None:
        options["speculative_config"] = {"method": "sjd", **sjd}
    options.update(kwargs)
    return LLM(**options)


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters, by short name."""
    counters = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            name = metric.name.removeprefix("vllm:spec_decode_")
            counters[name] = getattr(metric, "values", None) or getattr(metric, "value", 0)
    return counters


def sjd_state_after_idle(llm, timeout: float = 10.0) -> list[list[str]]:
    """Request ids the SJD proposers still hold once the engine has gone idle.

    The engine core tells the workers about finished requests on the step
    after they finish, which a background engine core runs on its own (an
    in-process one is stepped here); poll until that has happened.
    """
    import time

    in_process = hasattr(llm.llm_engine.engine_core, "engine_core")
    deadline = time.monotonic() + timeout
    while True:
        if in_process:
            llm.llm_engine.step()
        state = llm.collective_rpc("sjd_tracked_requests")
        if all(not ids for ids in state) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def assert_vllm_logits_match(model: Path, prompt: list[int], reference_logits, tol: float = 2e-3):
    """vLLM's top-20 prompt logprobs of `model` equal log_softmax(reference_logits).

    reference_logits: [len(prompt), V] from a transformers forward of the same
    weights. Also checks the greedy next token against the reference argmax.
    """
    import torch
    from vllm import SamplingParams

    expected = torch.log_softmax(reference_logits, dim=-1)
    llm = make_llm(model, skip_tokenizer_init=True, max_model_len=256, max_logprobs=20)
    try:
        output = llm.generate(
            [{"prompt_token_ids": prompt}],
            SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=20),
            use_tqdm=False,
        )[0]
    finally:
        shutdown(llm)
    # prompt_logprobs[i] scores token i given tokens < i, i.e. reference row i-1.
    compared = 0
    for i, logprobs in enumerate(output.prompt_logprobs):
        for token, entry in (logprobs or {}).items():
            assert entry.logprob == pytest.approx(float(expected[i - 1, token]), abs=tol)
            compared += 1
    assert compared >= 20 * (len(prompt) - 1)
    assert output.outputs[0].token_ids[0] == int(expected[-1].argmax())
