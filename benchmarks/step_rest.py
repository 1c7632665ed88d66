#!/usr/bin/env python
"""Where a pass's time goes outside the forward, AR against SJD, in alternating rounds.

    .venv/bin/python benchmarks/step_rest.py --in-flight 1 --configs ar k16 --rounds 4
    .venv/bin/python benchmarks/step_rest.py --in-flight 16 --configs ar k0 adaptive --rounds 3

Keeps one engine per configuration up (demo model, guidance, temperature 1,
unseeded images) and serves the same prompts on each in turn, the order
reversed every other round, so that the machine's drift falls on all of them.
Each round times the runner's parts by perf_counter (no profiler): wall ms a
pass, the forward (with the model head over the verified rows), the rest,
and of it the sampling step and the proposal. Configurations: `ar` (no
speculation), `adaptive` (SJD's default), `kN` (SJD with vLLM's table at K = N
for every batch size: `k0` runs plain steps through SJD's engine). SJD drafts
coupled, initial drafts "above" (the defaults).
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
# In this process: the timer wraps the runner itself.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from interleaved_load import unseeded_guided_requests  # noqa: E402

from vllm_sjd import demo  # noqa: E402


def speculative_config(name: str) -> dict | None:
    if name == "ar":
        return None
    if name == "adaptive":
        return {"method": "sjd", "num_speculative_tokens": 16}
    if name.startswith("k") and name[1:].isdigit():
        return {"method": "sjd", "num_speculative_tokens": max(int(name[1:]), 16),
                "dynamic_num_speculative_tokens": "off",
                "num_speculative_tokens_per_batch_size": [[1, 4096, int(name[1:])]]}
    raise ValueError(f"unknown configuration {name!r}: ar, adaptive or kN")


def timed_round(llm, prompts, params, in_flight: int) -> dict:
    """Serve the prompts `in_flight` at a time; ms a pass of each part."""
    llm.collective_rpc("sjd_step_timing", args=("start",))
    started = time.perf_counter()
    for i in range(0, len(prompts), in_flight):
        llm.generate(prompts[i:i + in_flight], params[i:i + in_flight], use_tqdm=False)
    wall = time.perf_counter() - started
    parts = llm.collective_rpc("sjd_step_timing", args=("stop",))[0]
    steps = parts["steps"]
    forward = parts["_model_forward"] + parts["compute_logits"]
    return {
        "passes": steps,
        "images_per_min": round(60 * len(prompts) / wall, 1),
        "wall_ms": round(1e3 * wall / steps, 3),
        "forward_ms": round(1e3 * forward / steps, 3),
        "rest_ms": round(1e3 * (wall - forward) / steps, 3),
        "sampling_ms": round(1e3 * parts["_sample"] / steps, 3),
        "proposal_ms": round(1e3 * parts["propose_draft_token_ids"] / steps, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-flight", type=int, default=1)
    ap.add_argument("--images", type=int, default=None, help="a round's images (default: 4 x in flight)")
    ap.add_argument("--configs", nargs="+", default=["ar", "k16"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = ap.parse_args()

    from vllm import LLM

    prompts, params = unseeded_guided_requests(args.images or 4 * args.in_flight)
    engines = {}
    for name in args.configs:
        options = dict(model=str(demo.MODEL_PATH), dtype="float32", max_model_len=512, seed=0,
                       enforce_eager=True, max_num_seqs=2 * args.in_flight)
        spec = speculative_config(name)
        engines[name] = LLM(**options) if spec is None else LLM(**options, speculative_config=spec)
        timed_round(engines[name], prompts[:args.in_flight], params[:args.in_flight], args.in_flight)

    rounds = {name: [] for name in args.configs}
    try:
        for r in range(args.rounds):
            for name in args.configs if r % 2 == 0 else args.configs[::-1]:
                result = timed_round(engines[name], prompts, params, args.in_flight)
                rounds[name].append(result)
                print(r, name, json.dumps(result), flush=True)
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()

    base = args.configs[0]
    print(f"\nmedians of {args.rounds} rounds, {args.in_flight} in flight; ratios per round "
          f"against {base}, then their median")
    print("| config | passes | wall ms/pass | forward ms/pass | rest ms/pass | sampling ms/pass "
          f"| proposal ms/pass | rest vs {base} | images/min vs {base} |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for name, results in rounds.items():
        med = {k: statistics.median(x[k] for x in results) for k in results[0]}
        rest = statistics.median(x["rest_ms"] / b["rest_ms"] for x, b in zip(results, rounds[base]))
        speed = statistics.median(x["images_per_min"] / b["images_per_min"]
                                  for x, b in zip(results, rounds[base]))
        summary[name] = {**med, "rest_vs_base": round(rest, 3), "images_per_min_vs_base": round(speed, 3)}
        print(f"| {name} | {med['passes']:.0f} | {med['wall_ms']:.2f} | {med['forward_ms']:.2f} "
              f"| {med['rest_ms']:.2f} | {med['sampling_ms']:.2f} | {med['proposal_ms']:.2f} "
              f"| {rest:.2f}x | {speed:.2f}x |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            {"settings": vars(args) | {"out": str(args.out), "time": time.ctime()},
             "rounds": rounds, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
