"""ZipAR on Emu3 (end-of-line rows, a three-token trailer) and LlamaGen (a bare
grid: rows start from stand-ins; 2-D rotary positions through M-RoPE; caption
embeddings as the prompt): greedy tokens are the argmax of the family's
reference fed exactly ZipAR's context."""

import pytest
import torch

from tests.conftest import make_llm, shutdown, sjd_state_after_idle
from vllm_sjd.config import ZipARConfig
from vllm_sjd.core.zipar import NO_TARGET, raster_tokens
from vllm_sjd.image_generation import image_sampling_params
from vllm_sjd.layouts.emu3 import Emu3ImageLayout, generate_size
from vllm_sjd.layouts.llamagen import LlamaGenImageLayout
from vllm_sjd.testing import tiny_emu3, tiny_llamagen

pytestmark = pytest.mark.engine

WINDOW = 4


def zipar_params(grid, **kwargs):
    params = image_sampling_params(grid, temperature=0.0, **kwargs)
    params.max_tokens = ZipARConfig(window=WINDOW).order_for(grid).num_tokens
    return params


def sampled(order):
    """(row of the reference's logits after the prompt, raster target) of each sampled token."""
    rows = [] if order.first_target == NO_TARGET else [(0, order.first_target)]
    return rows + [(k + 1, t) for k, t in enumerate(order.targets) if t != NO_TARGET]


def test_emu3_zipar_tokens_follow_their_context(tmp_path):
    model = tiny_emu3.build_tiny_emu3(tmp_path / "emu3")
    layout = Emu3ImageLayout(tiny_emu3.vocabulary_map(), image_area=96 * 96)
    size = generate_size("1:1", 96 * 96)
    grid = layout.grid(*size)
    order = ZipARConfig(window=WINDOW).order_for(grid)
    assert grid.cols > WINDOW and grid.row_end is not None
    llm = make_llm(model, speculative_config={"method": "zipar", "window": WINDOW},
                   max_model_len=1024)
    try:
        prompt = layout.prompt("a red circle on black background", *size)
        out = llm.generate(prompt, zipar_params(grid), use_tqdm=False)[0]
        assert sjd_state_after_idle(llm) == [[]]
    finally:
        shutdown(llm)
    prompt_ids = list(out.prompt_token_ids)
    stream = list(out.outputs[0].token_ids)
    raster = raster_tokens(stream, order, grid)
    grid.codes(raster)
    n = len(prompt_ids)
    logits = tiny_emu3.reference_logits(
        model, prompt_ids + stream, list(range(n)) + [n + p for p in order.positions]
    )[n - 1 :]
    allowed = grid.allowed_mask(torch.arange(grid.num_tokens), logits.shape[-1])
    rows = sampled(order)
    expected = [int(logits[r].masked_fill(~allowed[t], float("-inf")).argmax()) for r, t in rows]
    assert [raster[t] for _, t in rows] == expected


def test_llamagen_zipar_tokens_follow_their_context(tmp_path):
    from vllm_sjd.llamagen_text import LlamaGenTextEncoder

    model = tiny_llamagen.build_tiny_llamagen(tmp_path / "llamagen", seed=1)
    encoder = LlamaGenTextEncoder(tiny_llamagen.build_tiny_t5(tmp_path / "t5"), model)
    config, state = tiny_llamagen.tiny_config(), tiny_llamagen.load_state(model)
    layout = LlamaGenImageLayout.from_config(config)
    grid = layout.grid(*layout.default_size)
    order = ZipARConfig(window=WINDOW).order_for(grid)
    assert grid.row_end is None and order.num_tokens > grid.num_tokens  # stand-ins
    captions = ["a red circle on black background"]
    prompts = encoder.prompts(captions)
    scale = layout.default_guidance_scale
    uncond_ids = encoder.unconditional_prompt_token_ids(prompts[0])
    llm = make_llm(model, speculative_config={"method": "zipar", "window": WINDOW},
                   skip_tokenizer_init=True, enable_prompt_embeds=True)
    try:
        outs = llm.generate(
            prompts * 2,
            [zipar_params(grid),
             zipar_params(grid, guidance_scale=scale, unconditional_prompt_token_ids=uncond_ids)],
            use_tqdm=False,
        )
        assert sjd_state_after_idle(llm) == [[]]
    finally:
        shutdown(llm)
    features = encoder.caption_features(captions)[0]
    for out, guided in zip(outs, (False, True)):
        stream = list(out.outputs[0].token_ids)
        raster = raster_tokens(stream, order, grid)
        grid.codes(raster)
        positions = list(order.positions)
        logits = tiny_llamagen.reference_logits(config, state, features, stream,
                                                image_positions=positions)
        if guided:
            uncond = tiny_llamagen.reference_logits(config, state, None, stream, len(features),
                                                    image_positions=positions)
            logits = uncond + scale * (logits - uncond)
        logits = logits[len(features) - 1 :]
        rows = sampled(order)
        assert [raster[t] for _, t in rows] == [int(logits[r].argmax()) for r, _ in rows]
