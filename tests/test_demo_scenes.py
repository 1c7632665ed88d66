"""The demo model's scenes: deterministic renders that match their captions."""

import numpy as np
import pytest

from vllm_sjd.demo import scenes as sc
from vllm_sjd.demo.scorer import parse_caption


def test_same_seed_same_scenes_and_pixels():
    first, second = sc.sample_dataset(3, 6), sc.sample_dataset(3, 6)
    assert first == second
    for a, b in zip(first, second):
        assert np.array_equal(sc.render(a), sc.render(b))
    assert [s.caption for s in sc.sample_dataset(4, 6)] != [s.caption for s in first]


def test_render_is_a_64px_rgb_image_with_varied_pixels():
    image = sc.render(sc.sample_dataset(0, 1)[0])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20


def test_captions_follow_the_grammar_and_describe_the_scene():
    for scene in sc.sample_dataset(1, 200):
        objects, background = parse_caption(scene.caption)
        assert background == scene.background
        assert [(o["size"], o["colour"], o["shape"], o["position"]) for o in objects] == [
            (o.size, o.colour, o.shape, o.position) for o in scene.objects
        ]
        assert set(scene.caption.split()) <= set(sc.CAPTION_WORDS)
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.colour != b.colour
            assert {a.position, b.position} in ({"left", "right"}, {"top", "bottom"})


def test_unstated_details_vary():
    scenes = sc.sample_dataset(2, 300)
    assert {s.bg_style for s in scenes} == set(sc.BACKGROUND_STYLES)
    assert {o.fill for s in scenes for o in s.objects} == set(sc.FILL_STYLES)
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {o.colour for s in scenes for o in s.objects} == set(sc.COLOURS)


def test_object_pixels_sit_where_the_caption_says():
    for scene in sc.sample_dataset(5, 40):
        image = sc.render(scene).astype(int)
        chroma = image.max(-1) - image.min(-1)
        px_per_unit = sc.IMAGE_SIZE / sc.CANVAS  # the grammar is in canvas units
        for obj in scene.objects:
            x, y = int(obj.cx * px_per_unit), int(obj.cy * px_per_unit)
            assert chroma[y, x] > 60, scene.caption  # a saturated pixel at the centre


def test_demo_layout_reads_downsample_and_codebook_from_the_config():
    from types import SimpleNamespace

    from vllm_sjd.layouts import chameleon as cl
    from vllm_sjd.families import image_layout_for

    config = SimpleNamespace(
        architectures=["ChameleonXLLMXForConditionalGeneration"],
        sjd_image_layout={"target_size": 64, "downsample": 4, "num_codes": 512},
    )
    layout = image_layout_for(config)
    assert layout.default_size == (64, 64) and (64, 64) in layout.sizes
    grid = layout.grid(64, 64)
    assert (grid.rows, grid.cols) == (16, 16)
    assert (grid.code_low, grid.code_high) == (4, 4 + 512)
    assert grid.num_tokens == 16 * 17 + 1
    # 8 px size units: 64 px is 8 units.
    assert layout.prompt("x", 64, 64).endswith("<racm3:break><reserved08808><reserved08808>")
    # Without the key: Lumina-mGPT's 16 px codes, 32 px units, 8192 codes.
    plain = image_layout_for(SimpleNamespace(architectures=config.architectures))
    grid = plain.grid(768, 768)
    assert (grid.rows, grid.code_high) == (48, cl.CODE_HIGH)
    assert plain.sizes == cl.bucket_sizes(768)
    with pytest.raises(ValueError, match="multiple of 16"):
        cl.ChameleonImageLayout(120, downsample=8)
