#!/usr/bin/env python
"""AR and SJD engines side by side, served in alternating rounds at each load.

    .venv/bin/python benchmarks/interleaved_load.py --concurrency 1 4 16 64 --rounds 3

This machine's speed drifts within a run (two AR runs of one benchmark have
differed by 5-35%), more than the margins the load targets ask about. So
every engine stays up for the whole run, and each round serves the same
prompts on each engine back to back, the engines' order rotating from round
to round; the ratio to AR is taken per round and reported as median, min and
max. Requests are unseeded (as most clients send them), guided, temperature
1, so SJD's default adaptive window adapts them.
Writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import torch  # noqa: E402
from sjd_demo_benchmark import closed_loop  # noqa: E402

from vllm_sjd import demo  # noqa: E402
from vllm_sjd.demo import evaluation as dq  # noqa: E402
from vllm_sjd.demo import scenes as sc  # noqa: E402

CONFIGS = {
    "AR": None,
    "SJD default (adaptive)": {"method": "sjd", "num_speculative_tokens": 16},
    "SJD K16 fixed": {"method": "sjd", "num_speculative_tokens": 16,
                      "dynamic_num_speculative_tokens": "off"},
}
IMAGES = {1: 4, 4: 16, 16: 32, 64: 64}  # per round; one at a time is slow


def unseeded_guided_requests(count: int) -> tuple[list[str], list]:
    """`count` demo prompts from the scene grammar's captions, and their sampling
    parameters: guided at the layout's scale, temperature 1, no seed."""
    from transformers import AutoTokenizer

    from vllm_sjd.image_generation import image_sampling_params

    layout = demo.layout(demo.MODEL_PATH)
    grid = layout.grid(sc.IMAGE_SIZE, sc.IMAGE_SIZE)
    uncond = layout.unconditional_prompt_token_ids(
        AutoTokenizer.from_pretrained(demo.MODEL_PATH), sc.IMAGE_SIZE, sc.IMAGE_SIZE)
    prompts = [layout.prompt(s.caption, sc.IMAGE_SIZE, sc.IMAGE_SIZE)
               for s in dq.captions_for(count)][:count]
    params = [image_sampling_params(grid, temperature=1.0, top_k=layout.default_top_k,
                                    guidance_scale=layout.default_guidance_scale,
                                    unconditional_prompt_token_ids=uncond) for _ in prompts]
    return prompts, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "interleaved")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from vllm import LLM

    prompts, params = unseeded_guided_requests(max(IMAGES.get(c, 4 * c) for c in args.concurrency))

    engines = {}
    for name in args.configs:
        options = dict(model=str(demo.MODEL_PATH), dtype="float32", max_model_len=512, seed=0,
                       enforce_eager=True, disable_log_stats=False,
                       max_num_seqs=2 * max(args.concurrency))
        if CONFIGS[name] is not None:
            options["speculative_config"] = dict(CONFIGS[name])
        engines[name] = LLM(**options)
        closed_loop(engines[name], prompts[:2], params[:2], 2, f"{name}-warmup")

    rows = []
    try:
        for c in args.concurrency:
            n = IMAGES.get(c, 4 * c)
            for r in range(args.rounds):
                order = args.configs[r % len(args.configs):] + args.configs[:r % len(args.configs)]
                for name in order:
                    llm = engines[name]
                    _, latencies, wall, steps = closed_loop(
                        llm, prompts[:n], params[:n], c, f"{name}-c{c}-r{r}".replace(" ", "-"))
                    row = {"config": name, "concurrency": c, "round": r, "images": n,
                           "images_per_min": round(60 * n / wall, 2),
                           "latency_median_s": round(statistics.median(latencies), 3),
                           "passes_per_image": round(sum(steps) / n, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()

    summary = {}
    for c in args.concurrency:
        ar = {row["round"]: row["images_per_min"] for row in rows
              if row["config"] == "AR" and row["concurrency"] == c}
        for name in args.configs:
            mine = [row for row in rows if row["config"] == name and row["concurrency"] == c]
            ratios = [row["images_per_min"] / ar[row["round"]] for row in mine if row["round"] in ar]
            summary.setdefault(name, {})[c] = {
                "images_per_min_median": statistics.median(row["images_per_min"] for row in mine),
                "vs_AR_median": round(statistics.median(ratios), 3) if ratios else None,
                "vs_AR_min": round(min(ratios), 3) if ratios else None,
                "vs_AR_max": round(max(ratios), 3) if ratios else None,
                "passes_per_image": [row["passes_per_image"] for row in mine],
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"settings": {"rounds": args.rounds, "images_per_round": IMAGES, "time": time.ctime()},
         "rounds": rows, "summary": summary}, indent=1))
    print("| config | in flight | images/min (median) | x AR per round: median (min-max) "
          "| passes/image by round |")
    print("|---|---|---|---|---|")
    for name, by_c in summary.items():
        for c, s in by_c.items():
            print(f"| {name} | {c} | {s['images_per_min_median']:.1f} | {s['vs_AR_median']:.2f} "
                  f"({s['vs_AR_min']:.2f}-{s['vs_AR_max']:.2f}) | "
                  f"{' / '.join(f'{p:.0f}' for p in s['passes_per_image'])} |")


if __name__ == "__main__":
    main()
