"""SJD2's fine-tuning recipe (vllm_sjd/sjd2_finetune.py) on the bundled demo model, a few steps.

The checkpoint it writes says it was fine-tuned, carries the timestep table
(level 0 zero), has new language-model weights and the source's VQ model,
and loads in the real vLLM engine with the plugin, which serves it with SJD
and as plain AR: each gives a whole image of the layout.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_llm, shutdown
from vllm_sjd import demo
from vllm_sjd.core.denoising import TIMESTEP_WEIGHT, NoiseSettings
from vllm_sjd.image_generation import image_sampling_params
from vllm_sjd.sjd2_finetune import main as finetune


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("sjd2") / "demo-sjd2"
    finetune(["--out", str(out), "--scenes", "48", "--steps", "3", "--batch", "4", "--noise-levels", "8",
              "--held-out", "8"])
    return out


def test_the_checkpoint_is_the_source_with_tuned_weights_and_a_timestep_table(tuned):
    settings = NoiseSettings.of_config(json.loads((tuned / "config.json").read_text()))
    assert settings is not None and settings.noise_levels == 8 and settings.embedding_rms > 0
    before = load_file(str(demo.MODEL_PATH / "model.safetensors"))
    after = load_file(str(tuned / "model.safetensors"))
    table = after.pop(TIMESTEP_WEIGHT)
    assert table.shape[0] == 9 and (table[0] == 0).all() and (table[1:] != 0).any()
    assert set(after) == set(before)
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert all(torch.equal(after[k], before[k]) for k in before if ".vqmodel." in k)
    assert (tuned / demo.DECODER_FILE).is_file()
    losses = json.loads((tuned / "sjd2_report.json").read_text())["held_out_loss_by_level"]
    for when in ("before", "after"):  # the clean prefix and every level were scored
        assert set(losses[when]) == {str(t) for t in range(9)}
    assert losses["before"] != losses["after"]


@pytest.mark.engine
@pytest.mark.parametrize("sjd", [{"num_speculative_tokens": 8}, None], ids=["sjd", "ar"])
def test_the_tuned_checkpoint_serves_images_with_sjd_and_as_ar(tuned, sjd):
    grid = demo.layout(tuned).grid(64, 64)
    prompt = demo.layout(tuned).prompt("a large red circle in the center on a white background", 64, 64)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tuned)(prompt)["input_ids"]
    llm = make_llm(tuned, sjd=sjd)
    try:
        out = llm.generate([{"prompt_token_ids": ids}], image_sampling_params(grid, seed=1), use_tqdm=False)
        tokens = out[0].outputs[0].token_ids
        assert len(tokens) == grid.num_tokens
        assert grid.codes(tokens).shape == (grid.rows, grid.cols)
    finally:
        shutdown(llm)


def test_targets_are_the_next_tokens_from_the_header_to_the_end_of_the_noisy_run():
    from vllm_sjd.sjd2_finetune import batch_of

    gen = torch.Generator().manual_seed(0)
    seqs = [list(range(10, 30)), list(range(50, 65))]  # 8 image tokens at the end of each
    for _ in range(50):
        ids, levels, targets = batch_of(seqs, 8, NoiseSettings(4, 1.0), 2, gen)
        for r, seq in enumerate(seqs):
            scored = torch.nonzero(targets[r] >= 0).flatten()
            assert scored.min() == len(seq) - 9 and scored.max() < len(seq) - 1
            assert torch.equal(targets[r, scored], ids[r, scored + 1])
            noisy = torch.nonzero(levels[r]).flatten()
            if noisy.numel():  # the loss reaches the last noisy input, never past the sequence
                assert scored.max() == min(int(noisy.max()), len(seq) - 2)
            assert (levels[r, :len(seq) - 8] == 0).all()
