#!/usr/bin/env python
"""Prompt adherence and sampling entropy of the bundled demo model.

    VLLM_CPU_KVCACHE_SPACE=2 .venv/bin/python benchmarks/demo_quality.py --n 128

For N captions drawn from the scene grammar (seed 1000, disjoint from the
training draws' seeds 0 and 1), it reports the scorer's accuracy on

* ground truth: the renderer's images, and the same images through the VQ
  tokenizer (encode + decode), which bounds what the model can reach;
* a plain PyTorch sampling loop over transformers' Chameleon on the shipped
  weights, without guidance (scale 1) and with classifier-free guidance at
  scale 3 (Lumina-mGPT's recipe: the unconditional stream is the image header
  alone; guided logits uncond + s * (cond - uncond)); the same loop records
  the entropy of every free (code) position's distribution;
* vLLM serving the shipped checkpoint through vllm_sjd's Chameleon model,
  autoregressive (layout logits processor) and with SJD (16 speculative
  tokens), same temperature, top-k and seeds per request, no guidance.

AR and SJD sample the same distribution (SJD is lossless), so their
accuracies must agree within sampling noise; the script prints the binomial
standard errors and a two-proportion z statistic.

Entropy is per free image position in nats: of the model's distribution
after the layout mask at the sampling temperature (before top-k), and of the
top-k truncated distribution actually sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import torch  # noqa: E402

from vllm_sjd import demo  # noqa: E402
from vllm_sjd.demo.evaluation import (  # noqa: E402
    SIZE,
    captions_for,
    entropy_stats,
    ground_truth,
    save_grid,
    score_tokens,
    torch_sample,
    z_two_proportions,
)

# ---- vLLM -----------------------------------------------------------------------------

def vllm_sample(model_path, prompts, grid, *, sjd: bool, temperature, top_k, seeds, k: int):
    from vllm import LLM

    from vllm_sjd.image_generation import image_sampling_params

    options = dict(model=str(model_path), dtype="float32", max_model_len=512, seed=0,
                   enforce_eager=True, disable_log_stats=False)
    if sjd:
        options["speculative_config"] = {"method": "sjd", "num_speculative_tokens": k}
    else:
        from vllm_sjd.layouts.logits_processor import LayoutLogitsProcessor

        options["logits_processors"] = [LayoutLogitsProcessor]
    llm = LLM(**options)
    try:
        params = [image_sampling_params(grid, temperature=temperature, top_k=top_k, seed=s)
                  for s in seeds]
        t0 = time.monotonic()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.monotonic() - t0
        counters = {}
        for metric in llm.get_metrics():
            if metric.name.startswith("vllm:spec_decode"):
                counters[metric.name.removeprefix("vllm:spec_decode_")] = (
                    getattr(metric, "values", None) or getattr(metric, "value", 0))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return [list(o.outputs[0].token_ids) for o in outs], seconds, counters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=demo.MODEL_PATH)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--spec-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", nargs="*", default=[], choices=["truth", "torch", "vllm"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/demo_quality"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    layout = demo.layout(args.model)
    grid = layout.grid(SIZE, SIZE)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    scenes = captions_for(args.n)
    prompts = [layout.prompt(s.caption, SIZE, SIZE) for s in scenes]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert all(0 not in p for p in prompt_ids), "a prompt word is not in the vocabulary"
    uncond = layout.unconditional_prompt_token_ids(tokenizer, SIZE, SIZE)
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()},
                     "grid": [grid.rows, grid.cols], "prompt_example": prompts[0],
                     "prompt_ids_example": prompt_ids[0], "unconditional_prompt_ids": uncond}
    seeds = [args.seed * 100003 + i for i in range(args.n)]

    def report():
        (args.out / "demo_quality.json").write_text(json.dumps(results, indent=2))

    if "truth" not in args.skip:
        t = time.monotonic()
        results["ground_truth"] = ground_truth(scenes, args.model)
        print("ground truth", json.dumps(results["ground_truth"]), f"{time.monotonic() - t:.0f} s", flush=True)
        report()
    if "torch" not in args.skip:
        for scale in (1.0, args.guidance):
            t = time.monotonic()
            tokens, ent, ent_k = torch_sample(args.model, prompt_ids, uncond, grid, scale=scale,
                                              temperature=args.temperature, top_k=args.top_k,
                                              seed=args.seed)
            summary, images = score_tokens(scenes, tokens, grid, args.model)
            key = f"torch_cfg{scale:g}"
            results[key] = {"accuracy": summary, "entropy": entropy_stats(ent),
                            "entropy_after_top_k": entropy_stats(ent_k),
                            "seconds": round(time.monotonic() - t)}
            save_grid(images[:32], args.out / f"{key}.png")
            print(key, json.dumps(results[key]), flush=True)
            report()
    if "vllm" not in args.skip:
        for sjd in (False, True):
            tokens, seconds, counters = vllm_sample(
                args.model, prompts, grid, sjd=sjd, temperature=args.temperature,
                top_k=args.top_k, seeds=seeds, k=args.spec_tokens)
            summary, images = score_tokens(scenes, tokens, grid, args.model)
            key = "vllm_sjd" if sjd else "vllm_ar"
            results[key] = {"accuracy": summary, "seconds": round(seconds, 1), "spec_decode": counters}
            if sjd and counters.get("num_drafts"):
                results[key]["accepted_per_draft"] = round(
                    float(counters.get("num_accepted_tokens", 0)) / float(counters["num_drafts"]), 3)
            save_grid(images[:32], args.out / f"{key}.png")
            print(key, json.dumps(results[key]), flush=True)
            report()
        a, b = results["vllm_ar"]["accuracy"], results["vllm_sjd"]["accuracy"]
        results["ar_vs_sjd_caption_z"] = z_two_proportions(a["caption"], b["caption"], args.n)
        print("AR vs SJD whole-caption z =", results["ar_vs_sjd_caption_z"])
        report()


if __name__ == "__main__":
    main()
