"""Image layouts: the Chameleon/Lumina-mGPT grid, per-position constraints, sizes."""

import pytest
import torch

from vllm_sjd.models import chameleon_layout as cl
from vllm_sjd.models.layout import FREE, UnsupportedImageSize


def test_lumina_buckets_include_the_square_and_respect_the_aspect_limit():
    sizes = cl.bucket_sizes(768)
    assert (768, 768) in sizes
    for w, h in sizes:
        assert w % 32 == 0 and h % 32 == 0
        assert (w // 32) * (h // 32) <= 24 * 24
        assert max(w, h) / min(w, h) <= 4


def test_chameleon_grid_at_768():
    grid = cl.ChameleonImageLayout(768).grid(768, 768)
    assert (grid.rows, grid.cols) == (48, 48)
    # start, h, w, 48 rows of 48 codes + EOL, end of image: the paper's 2357 steps - 3 decoded.
    assert grid.num_tokens == 3 + 48 * 49 + 1
    assert grid.header == (8197, 8804 + 24, 8804 + 24)
    forced, low, high = grid.constraints(torch.arange(grid.num_tokens + 2))
    assert forced[:3].tolist() == [8197, 8828, 8828]
    assert forced[3 + 48].item() == 8803  # first end-of-line after 48 codes
    assert (forced[3:3 + 48] == FREE).all()
    assert forced[grid.num_tokens - 1].item() == 8196
    assert forced[grid.num_tokens + 1].item() == 8196  # past the image: still forced
    assert low[5].item() == 4 and high[5].item() == 8196


def test_non_square_size_and_codes_round_trip():
    layout = cl.ChameleonImageLayout(512)
    width, height = next((w, h) for w, h in layout.sizes if w != h)
    grid = layout.grid(width, height)
    assert (grid.rows, grid.cols) == (height // 16, width // 16)
    codes = torch.randint(4, 8196, (grid.rows, grid.cols))
    tokens = list(grid.header)
    for row in codes.tolist():
        tokens += row + [cl.END_OF_LINE]
    tokens += [cl.IMAGE_END, cl.END_OF_TURN]
    assert torch.equal(grid.codes(tokens), codes)
    broken = list(tokens)
    broken[3 + grid.cols] = 100  # a code where end-of-line belongs
    with pytest.raises(ValueError, match="breaks the layout"):
        grid.codes(broken)


def test_allowed_mask_matches_constraints():
    grid = cl.ChameleonImageLayout(256).grid(256, 256)
    mask = grid.allowed_mask(torch.tensor([0, 3, 3 + 16]), 9000)
    assert mask[0].sum() == 1 and mask[0, 8197]
    assert mask[1].sum() == 8192 and mask[1, 4] and not mask[1, 8196]
    assert mask[2].sum() == 1 and mask[2, 8803]


def test_unsupported_size_lists_the_supported_ones():
    layout = cl.ChameleonImageLayout(512)
    with pytest.raises(UnsupportedImageSize, match="supported sizes: .*512x512"):
        layout.grid(500, 500)


def test_prompt_template():
    assert cl.ChameleonImageLayout().prompt("a cat", 768, 512) == (
        "Generate an image of 768x512 according to the following prompt:\na cat<reserved08706>"
    )


def test_anole_layout_is_chameleons_1024_code_block():
    from vllm_sjd.models import image_layout_for

    layout = image_layout_for("ChameleonForConditionalGeneration")
    grid = layout.grid(512, 512)
    assert grid.num_tokens == 1 + 1024 + 1
    forced, low, high = grid.constraints(torch.arange(grid.num_tokens))
    assert forced[0] == cl.IMAGE_START and forced[-1] == cl.IMAGE_END
    assert (forced[1:-1] == FREE).all()
    with pytest.raises(UnsupportedImageSize, match="supported sizes: 512x512"):
        layout.grid(768, 768)
    assert image_layout_for("ChameleonXLLMXForConditionalGeneration", 512).sizes == cl.bucket_sizes(512)
    with pytest.raises(ValueError, match="no image layout"):
        image_layout_for("LlamaForCausalLM")
