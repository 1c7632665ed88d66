#!/usr/bin/env python
"""Does the demo model's image likelihood depend on each word of the caption?

    .venv/bin/python benchmarks/caption_discrimination.py --n 96

For N captions drawn from the scene grammar (the same draws as
benchmarks/demo_quality.py), the renderer's image goes through the model's
own VQ encoder, and the language model scores those image tokens (teacher
forcing, no sampling) under the true caption and under every caption that
changes one word of the first object: its shape, colour or size, and, for
one-object scenes, its position. An attribute is read when the true caption
gives the image the highest likelihood of its variants; a model that ignores
the word does so at chance, 1 / (variants). The margin is log p(image | true
caption) - max over the changed captions, in nats per image.

Sampling a picture that matches its caption needs the word to move the
likelihood; this measures that directly, without the scorer's noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vllm_sjd import demo  # noqa: E402
from vllm_sjd.demo import scenes as sc  # noqa: E402
from vllm_sjd.demo.evaluation import captions_for, to_model_input, vq_codes  # noqa: E402

SIZE = sc.IMAGE_SIZE


def changed_captions(scene: sc.Scene) -> dict[str, list[str]]:
    """Attribute -> the captions that change only that word of the first object."""
    first, rest = scene.objects[0], scene.objects[1:]
    taken_colours = {o.colour for o in scene.objects}
    choices = {
        "shape": sc.SHAPES,
        "colour": [c for c in sc.COLOURS if c not in taken_colours],
        "size": list(sc.SIZES),
    }
    if not rest:  # two objects sit on opposite sides; one may be anywhere
        choices["position"] = list(sc.POSITIONS)
    return {
        attr: [replace(scene, objects=(replace(first, **{attr: v}), *rest)).caption
               for v in values if v != getattr(first, attr)]
        for attr, values in choices.items()
    }


def image_token_ids(codes: torch.Tensor, grid, to_codebook) -> list[int]:
    """[rows, cols] codebook indices -> image-token ids in raster order, with the
    grid's forced tokens (end-of-line, end of image) where the layout puts them."""
    forced, _, _ = grid.constraints(torch.arange(grid.num_tokens))
    forced[forced < 0] = to_codebook.to_bpe(codes.reshape(-1))
    return forced.tolist()


@torch.no_grad()
def image_log_likelihood(model, prompt_ids: list[int], image_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + image_ids])
    # The head over the whole vocabulary: transformers' Chameleon forward masks
    # image tokens out of its logits.
    hidden = model.model(input_ids=ids).last_hidden_state[0, len(prompt_ids) - 1:-1]
    logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
    return float(logp.gather(1, ids[0, len(prompt_ids):, None]).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=demo.MODEL_PATH)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON summary here too")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from transformers import AutoTokenizer, ChameleonForConditionalGeneration

    layout = demo.layout(args.model)
    grid = layout.grid(SIZE, SIZE)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = ChameleonForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    encoder = demo.load_encoder(args.model)

    def score(caption: str, image_ids: list[int]) -> float:
        prompt_ids = tokenizer(layout.prompt(caption, SIZE, SIZE))["input_ids"]
        return image_log_likelihood(model, prompt_ids, image_ids)

    read: dict[str, list[bool]] = {}
    margins: dict[str, list[float]] = {}
    chance: dict[str, list[float]] = {}
    to_codebook = demo.to_codebook(args.model)
    for scene in captions_for(args.n):
        codes = vq_codes(encoder, to_model_input([sc.render(scene)]))[0]
        image_ids = image_token_ids(codes, grid, to_codebook)
        true = score(scene.caption, image_ids)
        for attr, captions in changed_captions(scene).items():
            best_other = max(score(c, image_ids) for c in captions)
            read.setdefault(attr, []).append(true > best_other)
            margins.setdefault(attr, []).append(true - best_other)
            chance.setdefault(attr, []).append(1 / (len(captions) + 1))
    summary = {
        attr: {"n": len(read[attr]), "read": round(statistics.fmean(read[attr]), 3),
               "chance": round(statistics.fmean(chance[attr]), 3),
               "median_margin_nats": round(statistics.median(margins[attr]), 2)}
        for attr in read
    }
    summary["model"] = str(args.model)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
