"""scripts/train_demo_model.py (vllm_sjd.demo.training): the same seed and step
counts give the same checkpoint.

A few steps of every phase, twice, as the shipped model was trained (the
language model's loss under torch.compile, which without deterministic
kernels and a cold compile differed in the last bits between runs); another
seed, eager to save the compile time, must give other weights.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_RUN = [
    "--budget-min", "0", "--scenes", "256", "--val-scenes", "16",
    "--vq-warmup-steps", "2", "--vq-crop-steps", "2", "--vq-full-steps", "2",
    "--lm-steps", "3", "--lm-eval-every", "3", "--polish-steps", "2",
]
FILES = ["model.safetensors", "vq/decoder.safetensors", "config.json", "tokenizer.json"]


def train(out: Path, seed: int = 3, *extra: str) -> dict[str, str]:
    subprocess.run([sys.executable, str(REPO / "scripts" / "train_demo_model.py"), *SMALL_RUN,
                    "--seed", str(seed), "--out", str(out), *extra],
                   check=True, cwd=REPO, capture_output=True)
    return {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in FILES}


def test_same_seed_same_checkpoint_other_seed_other_weights(tmp_path):
    first = train(tmp_path / "a")
    assert train(tmp_path / "b") == first
    other = train(tmp_path / "c", 4, "--no-compile")
    assert other["model.safetensors"] != first["model.safetensors"]
    assert other["vq/decoder.safetensors"] != first["vq/decoder.safetensors"]


def test_object_cells_are_the_cells_the_shapes_cover():
    """The object-weighted loss's cells: every cell mostly inside a shape is one,
    and no cell without any shape pixel is."""
    from vllm_sjd.demo import scenes as sc
    from vllm_sjd.demo.training.design import GRID
    from vllm_sjd.demo.training.images import render_all
    from vllm_sjd.demo.training.lm_batches import object_cells

    scenes = sc.sample_dataset(5, 24)
    cells = object_cells(render_all(scenes, workers=1))
    for scene, marked in zip(scenes, cells):
        cover = sc.object_coverage(scene, GRID).sum(axis=0)  # objects never overlap
        assert marked[cover >= 0.5].all(), scene.caption
        assert not marked[cover == 0].any(), scene.caption
        assert marked.any()


def test_object_weights_follow_the_image_token_order():
    """Weights line up with image_ids: 16 codes then end-of-line per row, then
    end of image; the end-of-line and end-of-image tokens weigh 1."""
    import numpy as np

    from vllm_sjd.demo.training.design import GRID, image_ids
    from vllm_sjd.demo.training.lm_batches import image_token_weights

    cells = np.zeros((1, GRID, GRID), bool)
    cells[0, 2, 5] = True
    weights = image_token_weights(cells, 4.0)[0]
    codes = np.zeros((GRID, GRID), np.int16)
    assert len(weights) == len(image_ids(codes))
    assert weights[2 * (GRID + 1) + 5] == 4.0
    assert (np.delete(weights, 2 * (GRID + 1) + 5) == 1.0).all()


def test_flat_object_fills_shade_each_object_evenly_and_keep_the_captions():
    """--object-fills flat: the same scenes and captions, every object one shade."""
    import argparse

    import numpy as np

    from vllm_sjd.demo import scenes as sc
    from vllm_sjd.demo.training.images import render_all, training_scenes

    varied = training_scenes(argparse.Namespace(object_fills="varied"), 5, 24)
    flat = training_scenes(argparse.Namespace(object_fills="flat"), 5, 24)
    assert [s.caption for s in flat] == [s.caption for s in varied]
    assert any(o.fill != "flat" for s in varied for o in s.objects)
    n = sc.IMAGE_SIZE * sc.SUPERSAMPLE
    x, y = sc._grid(n)

    def pixels(obj):  # [IMAGE_SIZE, IMAGE_SIZE, 2x2 supersampled pixels] inside obj
        mask = sc._shape_mask(obj, x, y)
        return mask.reshape(sc.IMAGE_SIZE, sc.SUPERSAMPLE, sc.IMAGE_SIZE, sc.SUPERSAMPLE)

    for scene, image in zip(flat, render_all(flat, workers=1)):
        for obj in scene.objects:
            # Pixels wholly inside the shape and wholly outside the other one
            # share one colour.
            inside = pixels(obj).all(axis=(1, 3))
            for other in (o for o in scene.objects if o is not obj):
                inside &= ~pixels(other).any(axis=(1, 3))
            colours = np.unique(image[inside].reshape(-1, 3), axis=0)
            assert len(colours) == 1, (scene.caption, len(colours))


def test_learning_rate_warms_up_then_stays_or_decays_to_zero():
    from vllm_sjd.demo.training.lm import learning_rate

    peak, warmup = 1e-3, 10
    assert learning_rate(0, peak, warmup, None) == peak / warmup
    assert learning_rate(9, peak, warmup, None) == peak
    assert learning_rate(500, peak, warmup, None) == peak
    assert learning_rate(10, peak, warmup, 110) == peak
    assert abs(learning_rate(60, peak, warmup, 110) - peak / 2) < 1e-12
    assert learning_rate(110, peak, warmup, 110) == 0.0


def test_auxiliary_labels_name_each_objects_cells_and_every_cells_place():
    """The probe's labels in image-token order: row and column at every code,
    nothing at end-of-line or end of image; each object's centre cell carries
    its shape and colour, and cells without a coloured pixel carry none."""
    import numpy as np

    from vllm_sjd.demo import scenes as sc
    from vllm_sjd.demo.training.design import GRID, image_ids
    from vllm_sjd.demo.training.images import render_all
    from vllm_sjd.demo.training.lm_batches import AUX_CLASSES, auxiliary_labels, object_cells

    scenes = sc.sample_dataset(6, 24)
    labels = auxiliary_labels(scenes)
    cells = object_cells(render_all(scenes, workers=1))
    code_at = np.arange(GRID * (GRID + 1)).reshape(GRID, GRID + 1)[:, :GRID]
    assert labels.shape == (24, len(AUX_CLASSES), len(image_ids(np.zeros((16, 16)))))
    not_codes = np.setdiff1d(np.arange(labels.shape[2]), code_at)
    assert (labels[:, :, not_codes] == -100).all()
    rows, columns = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    assert (labels[:, 2, code_at] == rows).all() and (labels[:, 3, code_at] == columns).all()
    for scene, scene_labels, marked in zip(scenes, labels, cells):
        shape, colour = scene_labels[0, code_at], scene_labels[1, code_at]
        for obj in scene.objects:
            r, c = int(obj.cy / sc.CANVAS * GRID), int(obj.cx / sc.CANVAS * GRID)
            assert sc.SHAPES[shape[r, c]] == obj.shape, scene.caption
            assert list(sc.COLOURS)[colour[r, c]] == obj.colour, scene.caption
        assert (shape[~marked] == -100).all() and (colour[~marked] == -100).all()


def test_width_decay_and_probe_reach_the_config_the_report_and_the_reproduce_line(tmp_path):
    """--lm-width 128 gives 2 heads of 64; --lm-decay-steps ends the phase there
    (before --lm-steps); the probe's weight reaches the report and its loss the
    history, its weights stay out of the checkpoint; the reproduce line names all three."""
    import json

    from safetensors import safe_open
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    out = tmp_path / "narrow"
    train(out, 3, "--no-compile", "--lm-width", "128", "--lm-warmup", "1",
          "--lm-decay-steps", "2", "--lm-aux-weight", "0.25")
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"],
            config["intermediate_size"]) == (128, 2, 384)
    report = json.loads((out / "train_report.json").read_text())
    assert (report["lm"]["steps"], report["lm"]["decay_steps"]) == (2, 2)
    assert " --lm-width 128 --lm-decay-steps 2 --lm-aux-weight 0.25 " in report["reproduce"]
    assert report["lm"]["aux_weight"] == 0.25
    assert all("loss_aux" in h for h in report["lm"]["history"] if "loss_active" in h)
    model = ChameleonForConditionalGeneration(ChameleonConfig(**config))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
