"""Judging the demo model's samples: ground truth, a reference sampler, statistics.

Shared by the benchmarks (benchmarks/demo_quality.py, sjd_demo_benchmark.py,
server_load.py, caption_discrimination.py): captions drawn from the scene
grammar (seed 1000, disjoint from the training draws), the scorer's accuracy
on rendered and VQ-reconstructed images, a plain PyTorch sampling loop over
transformers' Chameleon with Lumina-mGPT's guidance, z statistics for
comparing two configurations, and contact sheets.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import torch

from vllm_sjd import demo
from vllm_sjd.demo import scenes as sc
from vllm_sjd.demo import scorer

SIZE = sc.IMAGE_SIZE


def captions_for(n: int, seed: int = 1000) -> list[sc.Scene]:
    return sc.sample_dataset(seed, n)


def to_model_input(images) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@torch.no_grad()
def vq_codes(encoder, x: torch.Tensor) -> torch.Tensor:
    """The VQ encoder's codebook indices, [N, rows, cols], for images from to_model_input."""
    z = encoder.quant_conv(encoder.encoder(x))
    _, _, idx = encoder.quantize(z)
    return idx.view(z.shape[0], z.shape[2], z.shape[3])


def ground_truth(scenes, model_path) -> dict:
    images = [sc.render(s) for s in scenes]
    truth = scorer.summarise([scorer.score(s.caption, im) for s, im in zip(scenes, images)])
    enc, dec = demo.load_encoder(model_path), demo.load_decoder(model_path)
    x = to_model_input(images)
    with torch.no_grad():
        recon = torch.cat([dec.decode(vq_codes(enc, x[i:i + 32])) for i in range(0, len(x), 32)])
    mse = (((recon + 1) * 127.5).round() - ((x + 1) * 127.5).round()).pow(2).mean().item()
    pil = dec.to_pil(recon)
    vq = scorer.summarise([scorer.score(s.caption, im) for s, im in zip(scenes, pil)])
    return {"renders": truth, "vq_roundtrip": vq, "vq_psnr_db": round(10 * math.log10(255**2 / mse), 2)}


# ---- PyTorch sampling loop ------------------------------------------------------

def entropy_stats(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"mean": round(float(a.mean()), 4), "median": round(float(np.median(a)), 4),
            "p90": round(float(np.percentile(a, 90)), 4),
            "near_deterministic_frac": round(float((a < 0.05).mean()), 4), "n": int(a.size)}


@torch.no_grad()
def torch_sample(model, prompts_ids, uncond_ids, grid, *, scale, temperature, top_k, seed,
                 batch: int = 32):
    """Sample images token by token; returns (token lists, entropies, top-k entropies).

    `model`: a checkpoint path or a loaded ChameleonForConditionalGeneration."""
    from transformers import ChameleonForConditionalGeneration, DynamicCache

    if isinstance(model, (str, Path)):
        model = ChameleonForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    body, head = model.model, model.lm_head
    gen = torch.Generator().manual_seed(seed)
    positions = torch.arange(grid.num_tokens)
    forced_all, low_all, high_all = grid.constraints(positions)
    vocab = head.weight.shape[0]
    ids = torch.arange(vocab)
    outputs: list[list[int] | None] = [None] * len(prompts_ids)
    entropies, topk_entropies = [], []
    # Equal-length prompts batch together (no padding needed).
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts_ids):
        by_length.setdefault(len(p), []).append(i)
    for _, members in sorted(by_length.items()):
        for start in range(0, len(members), batch):
            rows = members[start:start + batch]
            b = len(rows)
            cond = torch.tensor([prompts_ids[i] for i in rows])
            cache_c = DynamicCache()
            h_c = body(input_ids=cond, past_key_values=cache_c, use_cache=True).last_hidden_state[:, -1]
            if scale != 1.0:
                cache_u = DynamicCache()
                unc = torch.tensor([uncond_ids] * b)
                h_u = body(input_ids=unc, past_key_values=cache_u, use_cache=True).last_hidden_state[:, -1]
            tokens = []
            for t in range(grid.num_tokens):
                forced = int(forced_all[t])
                if forced >= 0:
                    nxt = torch.full((b,), forced, dtype=torch.long)
                else:
                    logits = torch.log_softmax(head(h_c).float(), -1)
                    if scale != 1.0:
                        lu = torch.log_softmax(head(h_u).float(), -1)
                        logits = lu + scale * (logits - lu)
                    allowed = (ids >= int(low_all[t])) & (ids < int(high_all[t]))
                    logits = logits.masked_fill(~allowed, -math.inf) / temperature
                    logp = torch.log_softmax(logits, -1)
                    p = logp.exp()
                    entropies += (-(p * logp.nan_to_num(neginf=0.0)).sum(-1)).tolist()
                    if top_k:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, -math.inf)
                    logq = torch.log_softmax(logits, -1)
                    q = logq.exp()
                    topk_entropies += (-(q * logq.nan_to_num(neginf=0.0)).sum(-1)).tolist()
                    nxt = torch.multinomial(q, 1, generator=gen).squeeze(1)
                tokens.append(nxt)
                h_c = body(input_ids=nxt[:, None], past_key_values=cache_c, use_cache=True).last_hidden_state[:, -1]
                if scale != 1.0:
                    h_u = body(input_ids=nxt[:, None], past_key_values=cache_u,
                               use_cache=True).last_hidden_state[:, -1]
            stacked = torch.stack(tokens, 1).tolist()
            for i, row in zip(rows, stacked):
                outputs[i] = row
    return outputs, entropies, topk_entropies


def score_tokens(scenes, token_lists, grid, model_path) -> tuple[dict, list]:
    decoder, to_codebook = demo.load_decoder(model_path), demo.to_codebook(model_path)
    from vllm_sjd.image_generation import decode_image

    scores, images, broken = [], [], 0
    for scene, tokens in zip(scenes, token_lists):
        try:
            image = decode_image(tokens, grid, to_codebook, decoder)
        except ValueError:
            broken += 1
            image = None
        images.append(image)
        if image is None:
            s = scorer.Score(caption=scene.caption, checks={a: [False] for a in scorer.ATTRIBUTES})
        else:
            s = scorer.score(scene.caption, image)
        scores.append(s)
    summary = scorer.summarise(scores)
    # Fraction of an image's checks that pass: finer-grained than whole captions,
    # so AR and SJD can be compared even where few captions pass outright.
    checks = [[v for values in s.checks.values() for v in values] for s in scores]
    summary["check_fraction_per_image"] = [round(sum(c) / len(c), 4) for c in checks]
    summary["checks_passed"] = round(statistics.fmean(summary["check_fraction_per_image"]), 4)
    summary["layout_broken"] = broken
    summary["caption_se"] = round(math.sqrt(summary["caption"] * (1 - summary["caption"]) / len(scores)), 4)
    return summary, images


def z_two_proportions(a: float, b: float, n: int) -> float:
    p = (a + b) / 2
    se = math.sqrt(max(2 * p * (1 - p) / n, 1e-12))
    return round((a - b) / se, 2)


def z_two_means(a: list[float], b: list[float]) -> float:
    """Welch z of mean(a) - mean(b)."""
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return round((statistics.fmean(a) - statistics.fmean(b)) / max(se, 1e-12), 2)


def save_grid(images, path: Path, columns: int = 8):
    from PIL import Image

    tiles = [im if im is not None else Image.new("RGB", (SIZE, SIZE)) for im in images]
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * SIZE, rows * SIZE))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * SIZE, (i // columns) * SIZE))
    sheet.save(path)
