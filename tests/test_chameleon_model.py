"""Lumina-mGPT / Anole checkpoints load into vLLM and match transformers' logits."""

import json

import pytest
from vllm import SamplingParams

from tests.conftest import assert_vllm_logits_match, make_llm, shutdown
from vllm_sjd.testing.tiny_chameleon import build_tiny_chameleon, reference_logits
from vllm_sjd.layouts import chameleon as layout

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

    # Image codes are generable: nothing masks them, whatever the argmax is.
    assert_vllm_logits_match(path, PROMPT, reference_logits(path, PROMPT))


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
