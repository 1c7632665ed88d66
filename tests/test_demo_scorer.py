"""The prompt-adherence scorer: right on ground-truth renders, refuses wrong captions."""

import dataclasses

import numpy as np
import pytest

from vllm_sjd.demo import scenes as sc
from vllm_sjd.demo import scorer

# Measured on 1000 renders (seed 123): 100% per attribute and per caption.
# The bar leaves margin for edge cases the sample missed.
GROUND_TRUTH_BAR = 0.97


@pytest.fixture(scope="module")
def rendered():
    scenes = sc.sample_dataset(11, 150)
    return [(s, sc.render(s)) for s in scenes]


def test_ground_truth_renders_score_right(rendered):
    summary = scorer.summarise([scorer.score(s.caption, im) for s, im in rendered])
    assert summary["caption"] >= GROUND_TRUTH_BAR, summary
    for attribute in scorer.ATTRIBUTES:
        assert summary[attribute] >= GROUND_TRUTH_BAR, (attribute, summary)


def _variants(scene):
    """The scene's caption with one attribute changed, for each attribute."""
    first = scene.objects[0]
    others = lambda options, current: [o for o in options if o != current]  # noqa: E731
    used_colours = {o.colour for o in scene.objects}
    out = {
        "background": dataclasses.replace(
            scene, background=others(sc.BACKGROUNDS, scene.background)[0]),
        "colour": dataclasses.replace(scene, objects=(dataclasses.replace(
            first, colour=[c for c in sc.COLOURS if c not in used_colours][0]),) + scene.objects[1:]),
        "shape": dataclasses.replace(scene, objects=(dataclasses.replace(
            first, shape=others(sc.SHAPES, first.shape)[0]),) + scene.objects[1:]),
        "size": dataclasses.replace(scene, objects=(dataclasses.replace(
            first, size=others(sc.SIZES, first.size)[0]),) + scene.objects[1:]),
    }
    if len(scene.objects) == 1:
        out["position"] = dataclasses.replace(scene, objects=(dataclasses.replace(
            first, position=others(sc.POSITIONS, first.position)[0]),))
        out["count"] = dataclasses.replace(scene, objects=scene.objects * 2)
    else:
        out["count"] = dataclasses.replace(scene, objects=scene.objects[:1])
    return {k: v.caption for k, v in out.items()}


def test_a_wrong_caption_is_rejected_on_the_attribute_it_gets_wrong(rendered):
    checked = 0
    for scene, image in rendered[:40]:
        assert scorer.score(scene.caption, image).ok
        for attribute, caption in _variants(scene).items():
            result = scorer.score(caption, image)
            assert not result.ok, (attribute, caption)
            if attribute != "count":  # a doubled object also fails colour matching
                assert not result.attribute_ok(attribute), (attribute, caption, result.checks)
            checked += 1
    assert checked >= 40 * 5


def test_a_blank_or_noise_image_satisfies_no_caption(rendered):
    scene, _ = rendered[0]
    blank = np.full((128, 128, 3), 128, dtype=np.uint8)
    assert not scorer.score(scene.caption, blank).ok
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert not scorer.score(scene.caption, noise).ok


def test_parse_caption_inverts_the_grammar_and_refuses_others():
    objects, background = scorer.parse_caption(
        "a large red circle on the left and a small blue triangle on the right on a gray background")
    assert background == "gray"
    assert objects == [dict(size="large", colour="red", shape="circle", position="left"),
                       dict(size="small", colour="blue", shape="triangle", position="right")]
    with pytest.raises(ValueError):
        scorer.parse_caption("a red circle")
    with pytest.raises(ValueError):
        scorer.parse_caption("a huge red circle on the left on a gray background")


def test_scores_a_pil_image_at_another_resolution(rendered):
    from PIL import Image

    scene, image = rendered[1]
    big = Image.fromarray(image).resize((256, 256), Image.NEAREST)
    assert scorer.score(scene.caption, big).ok
