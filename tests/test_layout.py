"""Image layouts: the Chameleon/Lumina-mGPT grid, per-position constraints, sizes."""

import pytest
import torch

from vllm_sjd.layouts import chameleon as cl
from vllm_sjd.layouts.grid import FREE, UnsupportedImageSize


def test_lumina_buckets_include_the_square_and_respect_the_aspect_limit():
    sizes = cl.bucket_sizes(768)
    assert (768, 768) in sizes
    for w, h in sizes:
        assert w % 32 == 0 and h % 32 == 0
        assert (w // 32) * (h // 32) <= 24 * 24
        assert max(w, h) / min(w, h) <= 4


def test_chameleon_grid_at_768():
    layout = cl.ChameleonImageLayout(768)
    grid = layout.grid(768, 768)
    assert (grid.rows, grid.cols) == (48, 48)
    # The header (start, h, w) closes the prompt; then 48 rows of 48 codes + EOL
    # and end of image: the paper's 2357 steps less the 3 header tokens.
    assert layout.header(768, 768) == (8197, 8804 + 24, 8804 + 24)
    assert grid.header == () and grid.num_tokens == 48 * 49 + 1
    forced, low, high = grid.constraints(torch.arange(grid.num_tokens + 2))
    assert forced[48].item() == 8803  # first end-of-line after 48 codes
    assert (forced[:48] == FREE).all()
    assert forced[grid.num_tokens - 1].item() == 8196
    assert forced[grid.num_tokens + 1].item() == 8196  # past the image: still forced
    assert low[5].item() == 4 and high[5].item() == 8196


def test_a_generated_header_is_forced_token_by_token():
    from vllm_sjd.layouts.grid import ImageGrid

    grid = ImageGrid(width=64, height=32, rows=2, cols=4, header=(9, 8), row_end=7,
                     trailer=(6,), code_low=10, code_high=20)
    assert grid.num_tokens == 2 + 2 * 5 + 1
    forced, _, _ = grid.constraints(torch.arange(grid.num_tokens))
    assert forced.tolist() == [9, 8, -1, -1, -1, -1, 7, -1, -1, -1, -1, 7, 6]


def test_non_square_size_and_codes_round_trip():
    layout = cl.ChameleonImageLayout(512)
    width, height = next((w, h) for w, h in layout.sizes if w != h)
    grid = layout.grid(width, height)
    assert (grid.rows, grid.cols) == (height // 16, width // 16)
    codes = torch.randint(4, 8196, (grid.rows, grid.cols))
    tokens = []
    for row in codes.tolist():
        tokens += row + [cl.END_OF_LINE]
    tokens += [cl.IMAGE_END, cl.END_OF_TURN]
    assert torch.equal(grid.codes(tokens), codes)
    broken = list(tokens)
    broken[grid.cols] = 100  # a code where end-of-line belongs
    with pytest.raises(ValueError, match="breaks the layout"):
        grid.codes(broken)


def test_allowed_mask_matches_constraints():
    grid = cl.ChameleonImageLayout(256).grid(256, 256)
    mask = grid.allowed_mask(torch.tensor([0, 16, 17 * 16]), 9000)
    assert mask[0].sum() == 8192 and mask[0, 4] and not mask[0, 8196]
    assert mask[1].sum() == 1 and mask[1, 8803]
    assert mask[2].sum() == 1 and mask[2, 8196]


def test_a_top_k_that_keeps_every_code_is_dropped_and_a_smaller_one_kept():
    from vllm_sjd.image_generation import image_sampling_params

    grid = cl.ChameleonImageLayout(256).grid(256, 256)  # 8192 codes
    assert image_sampling_params(grid, top_k=8192).top_k == 0
    assert image_sampling_params(grid, top_k=2000).top_k == 2000
    ids = grid.token_ids()
    assert ids.numel() == 8192 + 2 and {8803, 8196} <= set(ids.tolist())  # end-of-line, -image


def test_unsupported_size_lists_the_supported_ones():
    layout = cl.ChameleonImageLayout(512)
    with pytest.raises(UnsupportedImageSize, match="supported sizes: .*512x512"):
        layout.grid(500, 500)


def test_prompt_template_ends_with_the_image_header():
    layout = cl.ChameleonImageLayout()
    assert layout.prompt("a cat", 768, 512) == (
        "Generate an image of 768x512 according to the following prompt:\na cat<reserved08706>"
        "<racm3:break><reserved08816><reserved08824>"
    )
    # Lumina-mGPT's unconditional stream: from the image start on, no text.
    assert layout.unconditional_prompt_token_ids(None, 768, 512) == [8197, 8804 + 16, 8804 + 24]
    assert layout.default_guidance_scale == 3.0


def test_anole_layout_is_chameleons_1024_code_block():
    from types import SimpleNamespace

    from vllm_sjd.families import image_layout_for

    def config(architecture):
        return SimpleNamespace(architectures=[architecture])

    layout = image_layout_for(config("ChameleonForConditionalGeneration"))
    grid = layout.grid(512, 512)
    assert grid.num_tokens == 1024 + 1
    assert layout.prompt("a cat", 512, 512) == "a cat<racm3:break>"
    forced, low, high = grid.constraints(torch.arange(grid.num_tokens))
    assert forced[-1] == cl.IMAGE_END
    assert (forced[:-1] == FREE).all()
    with pytest.raises(UnsupportedImageSize, match="supported sizes: 512x512"):
        layout.grid(768, 768)
    lumina = image_layout_for(config("ChameleonXLLMXForConditionalGeneration"), 512)
    assert lumina.sizes == cl.bucket_sizes(512)
    with pytest.raises(ValueError, match="no image layout"):
        image_layout_for(config("LlamaForCausalLM"))


def test_emu3_layout_from_its_vocabulary():
    from vllm_sjd.testing.tiny_emu3 import FIRST_VISUAL_ID, NUM_CODES, SPECIALS, vocabulary_map
    from vllm_sjd.layouts import emu3 as el

    layout = el.Emu3ImageLayout(vocabulary_map())
    assert layout.default_size == (720, 720) and (720, 720) in layout.sizes
    # "w:h" as Emu3's processor reads it: 16:9 is 120 x 68 tokens (rounded).
    assert el.generate_size("16:9") == (960, 544)
    grid = layout.grid(720, 720)
    assert (grid.rows, grid.cols) == (90, 90)
    assert grid.num_tokens == 90 * 91 + 3
    forced, low, high = grid.constraints(torch.arange(grid.num_tokens))
    assert forced[90].item() == SPECIALS[el.END_OF_LINE]
    assert forced[-3:].tolist() == [SPECIALS[el.END_OF_FRAME], SPECIALS[el.IMAGE_END],
                                    SPECIALS[el.END_OF_SEQUENCE]]
    assert (low[0].item(), high[0].item()) == (FIRST_VISUAL_ID, FIRST_VISUAL_ID + NUM_CODES)
    assert layout.prompt("a cat", 720, 720) == (
        "a cat masterpiece, film grained, best quality.<|image start|>90*90<|image token|>"
    )
    assert layout.unconditional_prompt(720, 720).startswith("lowres, bad anatomy")
    with pytest.raises(UnsupportedImageSize, match="720x720"):
        layout.grid(512, 512)


def test_llamagen_layout_is_a_bare_grid_of_the_checkpoint_size():
    from vllm_sjd.families import image_layout_for
    from vllm_sjd.layouts.llamagen import LlamaGenImageLayout
    from vllm_sjd.models.llamagen_config import llamagen_config

    layout = image_layout_for(llamagen_config("GPT-XL", 256))
    assert isinstance(layout, LlamaGenImageLayout)
    assert layout.sizes == [(256, 256)] and layout.default_size == (256, 256)
    assert layout.default_guidance_scale == 7.5
    grid = layout.grid(256, 256)
    assert (grid.rows, grid.cols, grid.num_tokens) == (16, 16, 256)
    assert grid.header == () and grid.trailer == () and grid.row_end is None
    forced, low, high = grid.constraints(torch.arange(grid.num_tokens + 3))
    assert (forced == FREE).all() and (low == 0).all() and (high == 16384).all()
    codes = torch.randint(0, 16384, (16, 16))
    assert torch.equal(grid.codes(codes.flatten().tolist()), codes)
    with pytest.raises(ValueError, match="breaks the layout"):
        grid.codes([16384] + codes.flatten().tolist()[1:])  # a null-caption id is not a code
    big = image_layout_for(llamagen_config("GPT-XL", 512)).grid(512, 512)
    assert (big.rows, big.cols, big.num_tokens) == (32, 32, 1024)
    with pytest.raises(UnsupportedImageSize, match="supported sizes: 256x256"):
        layout.grid(512, 512)


def test_llamagen_unconditional_prompt_is_the_null_caption_of_the_same_slots():
    from vllm_sjd.layouts.llamagen import LlamaGenImageLayout

    layout = LlamaGenImageLayout()
    assert layout.unconditional_prompt_token_ids() == list(range(16384, 16384 + 120))
    # A 5-row caption sits in slots 115..119 (LlamaGen left-pads); so does its partner.
    assert layout.unconditional_prompt_token_ids(None, 256, 256, caption_length=5) == [
        16384 + s for s in range(115, 120)
    ]
    assert layout.null_caption_id(0) == 16384
    for bad in (0, 121):
        with pytest.raises(ValueError, match="caption_length"):
            layout.unconditional_prompt_token_ids(caption_length=bad)


def test_llamagen_config_describes_gpt_xl():
    from vllm_sjd.models.llamagen_config import LlamaGenConfig, llamagen_config

    config = llamagen_config("GPT-XL", 512)
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (36, 20, 1280)
    assert (config.head_dim, config.intermediate_size, config.caption_dim) == (64, 3584, 2048)
    assert (config.codebook_size, config.cls_token_num, config.vocab_size) == (16384, 120, 16504)
    assert config.grid_size == 32 and config.max_position_embeddings >= 120 + 1024
    assert config.architectures == ["LlamaGenT2IForCausalLM"]
    assert LlamaGenConfig.model_type == "llamagen_t2i"
    with pytest.raises(ValueError, match="unknown LlamaGen model"):
        llamagen_config("GPT-XS")
