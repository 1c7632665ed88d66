"""AR vs SJD in the same vLLM engine build, on the same model and prompts, in one run.

Until the demo image model lands, the model is a tiny random-weight Llama with
peaked, context-insensitive next-token distributions (vllm_sjd/testing/tiny_llama.py,
preference=2.0): an optimistic setting for SJD, stated with its entropy.

For each configuration: forward passes per sequence (prefill + verify passes),
tokens per pass (step compression), wall time, and ratios against AR.

    .venv/bin/python benchmarks/ar_vs_sjd.py [--num-seqs 16] [--max-tokens 256]
"""

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def spec_counter(llm, name: str) -> float:
    return sum(
        m.value for m in llm.get_metrics() if m.name == f"vllm:spec_decode_{name}"
    )


def mean_entropy(model_path: Path, sequences: list[list[int]]) -> float:
    """Mean next-token entropy (nats, temperature 1) along sampled sequences."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(sequences)).logits.log_softmax(-1)
    return float(-(logits.exp() * logits).sum(-1).mean())


def run(model_path, sjd, prompts, params, batched: bool):
    from vllm import LLM

    options = dict(model=str(model_path), enforce_eager=True, dtype="float32",
                   max_model_len=512, disable_log_stats=False, seed=0)
    if sjd:
        options["speculative_config"] = {"method": "sjd", **sjd}
    llm = LLM(**options)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    drafts0 = spec_counter(llm, "num_drafts") if sjd else 0
    start = time.perf_counter()
    if batched:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    seconds = time.perf_counter() - start
    verify_passes = (spec_counter(llm, "num_drafts") - drafts0) if sjd else 0
    tokens = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outputs]
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    # AR: one pass per generated token. SJD: one prefill pass per sequence,
    # whose sample is the first token, then one pass per verify step.
    passes = verify_passes + len(prompts) if sjd else generated
    return dict(seconds=seconds, passes=passes, generated=generated, sequences=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()

    from vllm import SamplingParams

    from vllm_sjd.testing.tiny_llama import build_tiny_llama

    model_path = build_tiny_llama(Path(tempfile.mkdtemp()) / "peaked", preference=2.0)
    prompts = [{"prompt_token_ids": [4 + i % 56, 5, 6 + i % 7]} for i in range(args.num_seqs)]
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens,
                            min_tokens=args.max_tokens, ignore_eos=True)
    configs = [("AR", None)]
    for k in args.windows:
        configs.append((f"SJD K={k} uniform", {"num_speculative_tokens": k}))
    middle = args.windows[len(args.windows) // 2]
    configs.append((f"SJD K={middle} last_distribution",
                    {"num_speculative_tokens": middle, "initial_drafts": "last_distribution"}))

    rows = []
    for mode, batched in (("batch", True), ("one at a time", False)):
        results = {name: run(model_path, sjd, prompts, params, batched) for name, sjd in configs}
        ar = results["AR"]
        for name, r in results.items():
            rows.append((mode, name, r["passes"] / args.num_seqs, r["generated"] / r["passes"],
                         r["seconds"], ar["passes"] / r["passes"], ar["seconds"] / r["seconds"]))
        if mode == "batch":
            entropy = mean_entropy(model_path, ar["sequences"])

    print(f"\n{args.num_seqs} sequences x {args.max_tokens} tokens, temperature 1.0; "
          f"model mean next-token entropy {entropy:.2f} nats\n")
    print("| requests | config | passes/seq | tokens/pass | wall s | pass ratio vs AR | speed-up vs AR |")
    print("|---|---|---|---|---|---|---|")
    for mode, name, per_seq, per_pass, seconds, pass_ratio, speedup in rows:
        print(f"| {mode} | {name} | {per_seq:.1f} | {per_pass:.2f} | {seconds:.2f} | "
              f"{pass_ratio:.2f}x | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
