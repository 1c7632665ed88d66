"""Emu3-Gen checkpoints (transformers' format) load into vLLM and match transformers' logits."""

import json

import pytest

from tests.conftest import assert_vllm_logits_match
from vllm_sjd.testing.tiny_emu3 import FIRST_VISUAL_ID, build_tiny_emu3, reference_logits

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

    assert_vllm_logits_match(path, PROMPT, reference_logits(path, PROMPT))
