#!/usr/bin/env python
"""AR vs SJD on the bundled demo model, through the real vLLM engine, in one run.

    .venv/bin/python benchmarks/sjd_demo_benchmark.py --out benchmarks/results/demo

For one prompt set (captions from the scene grammar, several seeds each) and
classifier-free guidance on (the demo's default scale), it runs:

* a plain PyTorch/transformers sampling loop, AR, batch 1 (the baseline a
  user would write), timed per image; it also records the per-token entropy
  of the guided distribution SJD has to draft against;
* vLLM without speculation (AR) and with SJD at each window K, drafting mode
  and initial-draft mode (--drafting, --initial-drafts), one engine per
  configuration, in-process. Each engine serves the prompts with 1, 4 and 16
  requests in flight (a closed loop: a new request enters as one finishes),
  and reports forward passes per image (engine steps: prefill + one per token
  for AR, prefill + one verify pass per SJD step), tokens per pass, latency
  per image (median, p90), images per minute, and ratios against AR;
* prompt adherence (vllm_sjd.demo.scorer) of every configuration's images,
  the same prompts and seeds, with a two-proportion z against AR;
* a cProfile of one image at concurrency 1 per configuration, summed into
  the step's parts (model forward, sampling and verification, SJD proposer,
  scheduler), per forward pass.

Writes results.json and two plots (step compression vs K, latency and
throughput vs concurrency) to --out.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# The engine core in this process: the profile sees the model runner, and
# every configuration pays the same (no) inter-process hop.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from vllm_sjd import demo  # noqa: E402
from vllm_sjd.demo import evaluation as dq  # noqa: E402
from vllm_sjd.demo import scenes as sc  # noqa: E402

SIZE = sc.IMAGE_SIZE

# cProfile function names -> the step part they belong to (first match wins).
STEP_PARTS = {
    "model forward": ["_model_forward"],
    "layout mask + guidance": ["_apply_layout", "_guide"],
    "sampling + verification": ["_sample"],
    "SJD proposer": ["propose_draft_token_ids"],
    "scheduler": ["schedule", "update_from_output"],
}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def spec_draft_tokens(llm) -> float:
    """Drafts verified so far (each request's, guided twins included)."""
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_draft_tokens")


def closed_loop(llm, prompts, params, concurrency: int, tag: str):
    """Serve all prompts keeping `concurrency` requests in flight.

    Returns (token lists in prompt order, per-request latencies, wall seconds,
    forward passes per request: the steps that gave it tokens)."""
    engine = llm.llm_engine
    pending = list(range(len(prompts)))
    in_flight: dict[int, float] = {}  # prompt index -> start time
    tokens: dict[int, list[int]] = {}
    latency: dict[int, float] = {}
    passes = dict.fromkeys(range(len(prompts)), 0)
    start = time.perf_counter()
    while pending or in_flight:
        while pending and len(in_flight) < concurrency:
            i = pending.pop(0)
            engine.add_request(f"{tag}-{i}", prompts[i], params[i])
            in_flight[i] = time.perf_counter()
        for out in engine.step():
            # The engine may suffix the id it was given; the prefix names the prompt.
            match = re.match(re.escape(tag) + r"-(\d+)", out.request_id)
            if match:
                passes[int(match.group(1))] += 1
            if out.finished and match and int(match.group(1)) in in_flight:
                i = int(match.group(1))
                began = in_flight.pop(i)
                latency[i] = time.perf_counter() - began
                tokens[i] = list(out.outputs[0].token_ids)
    wall = time.perf_counter() - start
    order = range(len(prompts))
    return [tokens[i] for i in order], [latency[i] for i in order], wall, [passes[i] for i in order]


def profile_one(llm, prompt, param, tag: str) -> dict:
    """Seconds per part of one image's serving, from cProfile cumulative times."""
    profiler = cProfile.Profile()
    profiler.enable()
    closed_loop(llm, [prompt], [param], 1, tag)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    cumulative: dict[str, float] = {}
    for (_, _, name), (_, _, _, ct, _) in stats.items():
        # An override calling super() is nested in itself: keep the outermost.
        cumulative[name] = max(cumulative.get(name, 0.0), ct)
    parts = {part: round(sum(cumulative.get(n, 0.0) for n in names), 3)
             for part, names in STEP_PARTS.items()}
    parts["total"] = round(sum(tt for (_, _, tt, _, _) in stats.values()), 3)
    return parts


def step_parts(timed: dict, wall: float, passes: float) -> dict:
    """ms per forward pass: the wall time, the model's forward (with its head over
    the verified rows), SJD's sampling and proposal, and the rest (vLLM's input
    preparation, bookkeeping, scheduler)."""
    per_pass = {part: 1000 * seconds / passes for part, seconds in timed.items() if part != "steps"}
    parts = {
        "wall": 1000 * wall / passes,
        "forward": per_pass["_model_forward"] + per_pass["compute_logits"],
        "sampling + verification": per_pass["_sample"],
        "proposer": per_pass["propose_draft_token_ids"],
    }
    parts["rest"] = parts["wall"] - parts["forward"]
    parts["runner other"] = (per_pass["execute_model"] + per_pass["sample_tokens"]
                             - parts["forward"] - parts["sampling + verification"]
                             - parts["proposer"])
    parts["engine outside the runner"] = (parts["wall"] - per_pass["execute_model"]
                                          - per_pass["sample_tokens"])
    return {k: round(v, 3) for k, v in parts.items()}


def config_name(window: int, drafting: str, initial: str, dynamic: str = "off",
                lookahead: int = 0) -> str:
    if not window:
        return "AR again" if dynamic == "again" else "AR"
    if drafting == "zipar":
        return f"ZipAR W{window}"
    if drafting == "sjd2":
        return f"SJD2 K{window} T{initial}"
    if drafting == "sjd2-clean":
        return f"SJD2 K{window} denoising off"
    return (f"K{window} {drafting}/{initial}" + (f" lookahead {lookahead}" if lookahead else "")
            + (" dynamic" if dynamic != "off" else ""))


def grid_of(params):
    from vllm_sjd.layouts.constraints import grid_from_extra_args

    return grid_from_extra_args(params.extra_args)


def _with_max_tokens(params, max_tokens: int):
    params = params.clone()
    params.max_tokens = max_tokens
    return params


def _raster(tokens, zipar, grid) -> list[int]:
    from vllm_sjd.core.zipar import raster_tokens

    return raster_tokens(tokens, zipar.order_for(grid), grid)


def run_engine(model_path, config, prompts, params, concurrencies, profile_prompt, latency_images):
    from vllm import LLM

    window, drafting, initial, dynamic, lookahead = (*config, 0)[:5]
    options = dict(model=str(model_path), dtype="float32", max_model_len=512, seed=0,
                   enforce_eager=True, disable_log_stats=False, max_num_seqs=2 * max(concurrencies))
    zipar = None
    if drafting == "zipar":
        from vllm_sjd.config import ZipARConfig

        # ZipAR emits its stream order: the engine runs as many tokens as the
        # stream has, and the scorer gets them back in raster order.
        zipar = ZipARConfig(window=window)
        options["speculative_config"] = {"method": "zipar", "window": window}
        params = [_with_max_tokens(p, zipar.order_for(grid_of(p)).num_tokens) for p in params]
    elif drafting in ("sjd2", "sjd2-clean"):
        options["speculative_config"] = {"method": "sjd2", "num_speculative_tokens": window,
                                         "denoising": drafting == "sjd2"}
        if drafting == "sjd2":
            options["speculative_config"]["denoising_steps"] = int(initial)
    elif window:
        options["speculative_config"] = {"method": "sjd", "num_speculative_tokens": window,
                                         "drafting": drafting, "initial_drafts": initial,
                                         "dynamic_num_speculative_tokens": dynamic}
        if lookahead:
            options["speculative_config"]["row_lookahead"] = lookahead
    t0 = time.perf_counter()
    llm = LLM(**options)
    result = {"engine_start_s": round(time.perf_counter() - t0, 1), "by_concurrency": {}}
    tag = config_name(*config).replace(" ", "-").replace("/", "-")
    try:
        closed_loop(llm, prompts[:2], params[:2], 2, f"{tag}-warmup")
        if window and dynamic != "off":
            result["forward_cost_ms"] = [
                (t, round(1000 * s, 2)) for t, s in llm.collective_rpc("sjd_forward_costs")[0]
            ]
        for c in concurrencies:
            drafts = spec_draft_tokens(llm)
            n = latency_images if c == 1 else len(prompts)  # one at a time is slow
            if c == 1:  # where each pass's time goes, by perf_counter (no profiler)
                llm.collective_rpc("sjd_step_timing", args=("start",))
            tokens, latencies, wall, steps = closed_loop(
                llm, prompts[:n], params[:n], c, f"{tag}-c{c}")
            if c == 1:
                timed = llm.collective_rpc("sjd_step_timing", args=("stop",))[0]
                result["step_parts_ms"] = step_parts(timed, wall, sum(steps))
                print(tag, "step parts ms/pass", json.dumps(result["step_parts_ms"]), flush=True)
            per_image = sum(len(t) for t in tokens) / n
            passes = sum(steps) / n
            result["by_concurrency"][c] = {
                "images": n, "wall_s": round(wall, 2),
                "ms_per_pass": round(1000 * wall / (n * passes), 2) if c == 1 else None,
                "images_per_min": round(60 * n / wall, 2),
                "latency_median_s": round(statistics.median(latencies), 3),
                "latency_p90_s": round(percentile(latencies, 90), 3),
                "passes_per_image": round(passes, 1),
                "tokens_per_pass": round(per_image / passes, 3),
                "drafts_per_pass": round((spec_draft_tokens(llm) - drafts) / (n * passes), 2),
            }
            if zipar is not None:
                tokens = [_raster(t, zipar, grid_of(p)) for t, p in zip(tokens, params)]
            if n == len(prompts):
                result["tokens"] = tokens  # the last full pass over the prompts is scored
            print(tag, f"c={c}", json.dumps(result["by_concurrency"][c]), flush=True)
        result["profile"] = profile_one(llm, *profile_prompt, f"{tag}-profile")
        print(tag, "profile", json.dumps(result["profile"]), flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return result


def torch_baseline(model_path, prompt_ids, uncond, grid, seeds, scale, temperature, top_k):
    from transformers import ChameleonForConditionalGeneration

    model = ChameleonForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32).eval()
    latencies, tokens, entropy, entropy_k = [], [], [], []
    for ids, seed in zip(prompt_ids, seeds):
        t0 = time.perf_counter()
        out, ent, ent_k = dq.torch_sample(model, [ids], uncond, grid, scale=scale,
                                          temperature=temperature, top_k=top_k, seed=seed, batch=1)
        latencies.append(time.perf_counter() - t0)
        tokens += out
        entropy += ent
        entropy_k += ent_k
    return {
        "latency_median_s": round(statistics.median(latencies), 3),
        "latency_p90_s": round(percentile(latencies, 90), 3),
        "images_per_min": round(60 * len(latencies) / sum(latencies), 2),
        "passes_per_image": grid.num_tokens,
        "entropy": dq.entropy_stats(entropy),
        "entropy_after_top_k": dq.entropy_stats(entropy_k),
        "tokens": tokens,
    }


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["vllm"]
    c1 = min(next(iter(configs.values()))["by_concurrency"], key=int)  # fewest in flight
    fig, ax = plt.subplots(figsize=(6, 4))
    modes: dict[str, list[tuple[int, float]]] = {}
    for name, cfg in configs.items():
        if not name.startswith(("AR", "ZipAR", "SJD2")):
            window, mode = name.split(" ", 1) if " " in name else (name, "independent/uniform")
            if mode.endswith(" dynamic"):
                continue  # its K varies: not a point of this curve
            modes.setdefault(mode, []).append(
                (int(window[1:]), cfg["by_concurrency"][c1]["tokens_per_pass"]))
    ks = sorted({k for points in modes.values() for k, _ in points})
    for mode, points in modes.items():
        points.sort()
        ax.plot([k for k, _ in points], [t for _, t in points], "o-", label=mode)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="AR")
    ax.set_xlabel("SJD window K")
    ax.set_ylabel("tokens per forward pass")
    ax.set_xticks(ks)
    ax.set_title(f"Demo model, guidance on, {c1} in flight")
    ax.legend(fontsize=7, title="drafting/initial drafts", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "step_compression_vs_k.png", dpi=120)

    if any("accuracy" in cfg for cfg in configs.values()):
        plot_passes_vs_adherence(configs, c1, out)
    if max(len(cfg["by_concurrency"]) for cfg in configs.values()) < 2:
        return  # one concurrency: nothing to draw against it
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, cfg in configs.items():
        cs = sorted(int(c) for c in cfg["by_concurrency"])
        left.plot(cs, [cfg["by_concurrency"][str(c)]["latency_median_s"] for c in cs], "o-", label=name)
        right.plot(cs, [cfg["by_concurrency"][str(c)]["images_per_min"] for c in cs], "o-", label=name)
    for axis, label in ((left, "median latency per image (s)"), (right, "images per minute")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("requests in flight")
        axis.set_ylabel(label)
        axis.set_xticks(cs, [str(c) for c in cs])
        axis.legend(fontsize=8)
    fig.suptitle("Demo model on vLLM (CPU), guidance on")
    fig.tight_layout()
    fig.savefig(out / "latency_vs_concurrency.png", dpi=120)


def plot_passes_vs_adherence(configs: dict, c1, out: Path) -> None:
    """Forward passes per image against the share of caption checks passed, per configuration."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, cfg in configs.items():
        accuracy = cfg.get("accuracy")
        if accuracy is None:
            continue
        passes = cfg["by_concurrency"][c1]["passes_per_image"]
        ax.plot(passes, accuracy["checks_passed"], "s" if name.startswith("ZipAR") else "o")
        ax.annotate(name, (passes, accuracy["checks_passed"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("forward passes per image")
    ax.set_ylabel("caption checks passed (share)")
    ax.set_title("Demo model, guidance on: speed against prompt adherence")
    fig.tight_layout()
    fig.savefig(out / "passes_vs_adherence.png", dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=demo.MODEL_PATH)
    ap.add_argument("--captions", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=2, help="seeds per caption")
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--drafting", nargs="+", default=["independent"],
                    choices=["independent", "coupled", "gumbel"])
    ap.add_argument("--initial-drafts", nargs="+", default=["uniform"],
                    choices=["uniform", "last_distribution", "above"])
    ap.add_argument("--dynamic", nargs="+", default=["off"], choices=["off", "unseeded", "all"],
                    help="SJD's dynamic window per configuration ('unseeded': the default, "
                         "seeded requests keep the window; 'all': they adapt too)")
    ap.add_argument("--unseeded", action="store_true",
                    help="requests without seeds (as most clients send them), so the default "
                         "dynamic window adapts them")
    ap.add_argument("--zipar-windows", type=int, nargs="*", default=[],
                    help="ZipAR's W per configuration (lossy; W = 16 on the demo's rows is AR)")
    ap.add_argument("--sjd2-windows", type=int, nargs="*", default=[],
                    help="SJD2's K per configuration (a checkpoint fine-tuned by scripts/finetune_sjd2.py)")
    ap.add_argument("--sjd2-steps", type=int, nargs="+", default=[4],
                    help="SJD2's denoising steps T (the window's noisy tail) per configuration")
    ap.add_argument("--sjd2-clean", action="store_true",
                    help="also run each SJD2 window with denoising off (clean drafts only)")
    ap.add_argument("--row-lookahead", type=int, nargs="*", default=[],
                    help="also run each SJD configuration with these row lookaheads (L)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--ar-again", action="store_true",
                    help="run AR once more after the others: how far two runs of one "
                         "configuration differ on this machine")
    ap.add_argument("--baseline-images", type=int, default=8,
                    help="images of the plain PyTorch loop (0: skip it)")
    ap.add_argument("--latency-images", type=int, default=8,
                    help="images served one at a time (concurrency 1)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--guidance", type=float, default=None, help="default: the layout's")
    ap.add_argument("--top-k", type=int, default=None, help="default: the layout's")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plots from --out/results.json")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads((args.out / "results.json").read_text()), args.out)
        return
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from vllm_sjd.image_generation import image_sampling_params

    layout = demo.layout(args.model)
    grid = layout.grid(SIZE, SIZE)
    scale = args.guidance if args.guidance is not None else layout.default_guidance_scale
    top_k = args.top_k if args.top_k is not None else layout.default_top_k
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    uncond = layout.unconditional_prompt_token_ids(tokenizer, SIZE, SIZE)
    scenes = [s for s in dq.captions_for(args.captions) for _ in range(args.seeds)]
    seeds = [None if args.unseeded else 1000 + i for i in range(len(scenes))]
    prompts = [layout.prompt(s.caption, SIZE, SIZE) for s in scenes]
    params = [image_sampling_params(grid, temperature=args.temperature, top_k=top_k, seed=seed,
                                    guidance_scale=scale, unconditional_prompt_token_ids=uncond)
              for seed in seeds]
    results: dict = {
        "settings": {"model": str(args.model), "images": len(prompts), "captions": args.captions,
                     "seeds_per_caption": args.seeds, "seeded": not args.unseeded, "size": SIZE, "tokens_per_image": grid.num_tokens,
                     "guidance_scale": scale, "top_k": top_k, "temperature": args.temperature,
                     "torch": torch.__version__, "threads": torch.get_num_threads()},
        "vllm": {},
    }

    def save():
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    # The scorer's own accuracy on the renderer's images and on their VQ round trip.
    results["ground_truth"] = dq.ground_truth(dq.captions_for(args.captions), args.model)
    save()
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    n_base = args.baseline_images
    if n_base > 0:
        base = torch_baseline(args.model, prompt_ids[:n_base], uncond, grid, seeds[:n_base],
                              scale, args.temperature, top_k)
        accuracy, _ = dq.score_tokens(scenes[:n_base], base.pop("tokens"), grid, args.model)
        base["accuracy"] = accuracy
        results["torch_baseline"] = base
        print("torch baseline", json.dumps(base), flush=True)
        save()

    vocab_size = json.loads((args.model / "config.json").read_text())["vocab_size"]
    configs = [(0, "", "", "off")] + [(k, d, i, m) for k in args.windows for d in args.drafting
                                      for i in args.initial_drafts for m in args.dynamic]
    configs += [(k, d, i, m, la) for la in args.row_lookahead for k in args.windows
                for d in args.drafting for i in args.initial_drafts for m in args.dynamic]
    configs += [(w, "zipar", "", "off") for w in args.zipar_windows]
    configs += [(k, "sjd2", str(t), "off") for k in args.sjd2_windows for t in args.sjd2_steps]
    configs += [(k, "sjd2-clean", "", "off") for k in args.sjd2_windows if args.sjd2_clean]
    if args.ar_again:
        configs.append((0, "", "", "again"))
    for config in configs:
        name = config_name(*config)
        res = run_engine(args.model, config, prompts, params, args.concurrency,
                         (prompts[0], params[0]), args.latency_images)
        if config[0] and config[1] not in ("zipar", "sjd2", "sjd2-clean"):
            # The proposer's state per request: q of every slot, plus one image
            # row of verified rows for initial drafts "above" (float32).
            rows = config[0] + (grid.row_stride if config[2] == "above" else 0)
            res["window_state_mb_per_request"] = round(rows * vocab_size * 4 / 2**20, 2)
        summary, images = dq.score_tokens(scenes, res.pop("tokens"), grid, args.model)
        res["accuracy"] = summary
        dq.save_grid(images[:32], args.out / f"{name.replace(' ', '_').replace('/', '-')}.png")
        results["vllm"][name] = res
        save()

    ar = results["vllm"]["AR"]
    for name, res in results["vllm"].items():
        res["vs_AR"] = {}
        for c, row in res["by_concurrency"].items():
            ref = ar["by_concurrency"][c]
            res["vs_AR"][c] = {
                "pass_ratio": round(ref["passes_per_image"] / row["passes_per_image"], 2),
                "latency_speedup": round(ref["latency_median_s"] / row["latency_median_s"], 2),
                "throughput_ratio": round(row["images_per_min"] / ref["images_per_min"], 2),
            }
        res["caption_z_vs_AR"] = dq.z_two_proportions(
            res["accuracy"]["caption"], ar["accuracy"]["caption"], len(prompts))
        res["checks_z_vs_AR"] = dq.z_two_means(res["accuracy"]["check_fraction_per_image"],
                                               ar["accuracy"]["check_fraction_per_image"])
    results["vllm"] = json.loads(json.dumps(results["vllm"]))  # concurrency keys as strings
    save()
    plot(results, args.out)
    print(json.dumps({k: {"vs_AR": v["vs_AR"], "caption": v["accuracy"]["caption"],
                          "z": v["caption_z_vs_AR"],
                          "checks_passed": v["accuracy"]["checks_passed"], "checks_z": v["checks_z_vs_AR"]} for k, v in results["vllm"].items()}, indent=1))


if __name__ == "__main__":
    main()
