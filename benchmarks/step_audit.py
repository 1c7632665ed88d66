#!/usr/bin/env python
"""Torch calls and host reads per SJD step on the bundled demo model.

    .venv/bin/python benchmarks/step_audit.py --in-flight 1 4

Serves guided, seeded demo images with SJD (the default drafting, a fixed
window) and AR, counting in each step's sampling and proposal
(vllm_sjd/testing/step_audit.py): torch calls, and reads of tensors on the
host (each one a device-to-host sync on a GPU). Prints the medians of window
steps (AR: every step) and the kinds of reads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from vllm_sjd import demo  # noqa: E402
from vllm_sjd.demo import scenes as sc  # noqa: E402


def audit(llm, prompts, params) -> list[dict]:
    llm.collective_rpc("sjd_step_audit", args=("start",))
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        steps = llm.collective_rpc("sjd_step_audit", args=("stop",))[0]
    return steps


def summary(steps: list[dict], window_steps: bool) -> dict:
    chosen = [s for s in steps if s["drafts"] > 0] if window_steps else steps
    reads, where = Counter(), Counter()
    for s in chosen:
        reads.update(s["reads"])
        where.update(s["where"])
    return {
        "steps": len(chosen),
        "calls": statistics.median(s["calls"] for s in chosen),
        "host_reads": statistics.median(s["host_reads"] for s in chosen),
        "max_host_reads": max(s["host_reads"] for s in chosen),
        "reads_per_step": {k: round(v / len(chosen), 2) for k, v in sorted(reads.items())},
        "where_per_step": {k: round(v / len(chosen), 2) for k, v in sorted(where.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM

    from vllm_sjd.image_generation import image_sampling_params

    layout = demo.layout(demo.MODEL_PATH)
    grid = layout.grid(sc.IMAGE_SIZE, sc.IMAGE_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(demo.MODEL_PATH)
    uncond = layout.unconditional_prompt_token_ids(tokenizer, sc.IMAGE_SIZE, sc.IMAGE_SIZE)
    captions = ["a red circle on a blue background", "two green squares", "a yellow triangle",
                "three small stars"]
    for window in (args.window, 0):
        options = dict(model=str(demo.MODEL_PATH), dtype="float32", max_model_len=512, seed=0,
                       enforce_eager=True, max_num_seqs=2 * max(args.in_flight))
        if window:
            options["speculative_config"] = {"method": "sjd", "num_speculative_tokens": window,
                                             "dynamic_num_speculative_tokens": "off"}
        llm = LLM(**options)
        try:
            for n in args.in_flight:
                prompts = [layout.prompt(captions[i % len(captions)], sc.IMAGE_SIZE, sc.IMAGE_SIZE)
                           for i in range(n)]
                params = [image_sampling_params(grid, temperature=1.0, top_k=layout.default_top_k,
                                                seed=100 + i,
                                                guidance_scale=layout.default_guidance_scale,
                                                unconditional_prompt_token_ids=uncond)
                          for i in range(n)]
                steps = audit(llm, prompts, params)
                name = f"K{window}" if window else "AR"
                print(name, f"in_flight={n}", summary(steps, window_steps=bool(window)), flush=True)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm


if __name__ == "__main__":
    main()
