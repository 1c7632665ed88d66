"""Lumina-mGPT / Anole checkpoints load into vLLM and match transformers' logits."""

import json

import pytest
import torch
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown
from tests.tiny_chameleon import build_tiny_chameleon, reference_logits
from vllm_sjd.models import chameleon_layout as layout

pytestmark = pytest.mark.engine

PROMPT = [1, 500, 7000, 8710, 42, 9, layout.IMAGE_START, layout.SIZE_TOKEN_BASE + 8,
          layout.SIZE_TOKEN_BASE + 8, 100, 2000, 8000]


@pytest.mark.parametrize("variant", ["lumina", "anole", "lumina-swin"])
def test_logits_match_transformers(variant, tmp_path):
    path = build_tiny_chameleon(
        tmp_path / variant, lumina=variant != "anole", swin_norm=variant.endswith("swin")
    )
    index = json.loads((path / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert "model.layers.0.self_attn.q_norm.weight" in keys
    assert any(k.startswith("model.vqmodel.") for k in keys)

    expected = torch.log_softmax(reference_logits(path, PROMPT), dim=-1)
    llm = make_llm(path, skip_tokenizer_init=True, max_model_len=256, max_logprobs=20)
    try:
        output = llm.generate(
            [{"prompt_token_ids": PROMPT}],
            SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=20),
            use_tqdm=False,
        )[0]
    finally:
        shutdown(llm)
    # prompt_logprobs[i] scores token i given tokens < i, i.e. row i-1.
    compared = 0
    for i, logprobs in enumerate(output.prompt_logprobs):
        if logprobs is None:
            continue
        for token, entry in logprobs.items():
            assert entry.logprob == pytest.approx(float(expected[i - 1, token]), abs=2e-3)
            compared += 1
    assert compared >= 20 * (len(PROMPT) - 1)
    # Image codes can be generated: the greedy next token is the reference argmax,
    # whichever range it falls in.
    assert output.outputs[0].token_ids[0] == int(expected[-1].argmax())


def test_tensor_parallel_2_gives_the_reference_greedy_tokens(tmp_path):
    path = build_tiny_chameleon(tmp_path / "tp", lumina=True, seed=3)
    expected, tokens = [], list(PROMPT)
    for _ in range(12):
        tokens.append(int(reference_logits(path, tokens)[-1].argmax()))
    expected = tokens[len(PROMPT):]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        llm = make_llm(path, skip_tokenizer_init=True, max_model_len=256,
                       tensor_parallel_size=2)
    try:
        output = llm.generate(
            [{"prompt_token_ids": PROMPT}],
            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
            use_tqdm=False,
        )[0]
    finally:
        shutdown(llm)
    assert list(output.outputs[0].token_ids) == expected
