"""Emu3-Gen checkpoints (transformers' format) load into vLLM and match transformers' logits."""

import json

import pytest
import torch
from vllm import SamplingParams

from tests.conftest import make_llm, shutdown
from tests.tiny_emu3 import FIRST_VISUAL_ID, build_tiny_emu3, reference_logits

pytestmark = pytest.mark.engine

PROMPT = [15, 40, 41, 42, 12, 14, FIRST_VISUAL_ID + 7, FIRST_VISUAL_ID + 300, 10, 11]


def test_logits_match_transformers(tmp_path):
    path = build_tiny_emu3(tmp_path / "emu3")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1
    # The hub format of Emu3-Gen-hf, as transformers saves it.
    assert "text_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "text_model.lm_head.weight" in keys
    assert any(k.startswith("vqmodel.") for k in keys)

    expected = torch.log_softmax(reference_logits(path, PROMPT), dim=-1)
    llm = make_llm(path, skip_tokenizer_init=True, max_model_len=512, max_logprobs=20)
    try:
        output = llm.generate(
            [{"prompt_token_ids": PROMPT}],
            SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=20),
            use_tqdm=False,
        )[0]
    finally:
        shutdown(llm)
    compared = 0
    for i, logprobs in enumerate(output.prompt_logprobs):
        if logprobs is None:
            continue
        for token, entry in logprobs.items():
            assert entry.logprob == pytest.approx(float(expected[i - 1, token]), abs=2e-3)
            compared += 1
    assert compared >= 20 * (len(PROMPT) - 1)
    assert output.outputs[0].token_ids[0] == int(expected[-1].argmax())
