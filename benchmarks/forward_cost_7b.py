#!/usr/bin/env python
"""Forward cost of a (K+1)-token verify pass against a 1-token pass, 7B scale.

    python benchmarks/forward_cost_7b.py --attention flex sdpa --out forward_cost_7b.json  # on a GPU

SJD's speed-up at serving scale is (step compression) / (cost of a pass that
carries K+1 tokens per sequence, relative to a 1-token pass). Step compression
is measured on the demo model (benchmarks/sjd_demo_benchmark.py); this script measures
the cost ratio on a decoder shaped like Lumina-mGPT-7B (Chameleon-7B: 32 layers,
width 4096, 32 heads of 128, SwiGLU 11008, vocabulary 65536), random bf16
weights, plain PyTorch:

* one decode step over a static KV cache holding `context` tokens, for batch B
  (B=2 is one request with classifier-free guidance) and q new tokens per
  sequence (q=1 is plain AR, q=K+1 is an SJD verify pass);
* the step includes what SJD needs beyond AR: logits for all q positions and
  their softmax in float32;
* attention three ways: SDPA with a boolean mask, plain matmuls + softmax,
  and compiled flex_attention (which splits the key axis for short queries, as
  a serving engine's paged decode kernels do);
* each configuration is captured in a CUDA graph (as vLLM runs decode steps),
  replayed `--iters` times; the median of CUDA-event timings is reported.

Left out, each well under 1% of a step's FLOPs at this size: Chameleon's
query/key layer norms and rotary embeddings.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch
import torch.nn.functional as F

LUMINA_7B = dict(layers=32, width=4096, heads=32, ffn=11008, vocab=65536)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = 1024  # one compile per (q, context, batch)
    return torch.compile(flex_attention, dynamic=False)


def window_block_mask(q: int, context: int):
    """Query i (at position context + i) sees keys 0..context + i."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, qi, kv: kv <= qi + context,
                             B=None, H=None, Q_LEN=q, KV_LEN=context + q, device="cuda")


class Decoder:
    """A Llama/Chameleon-shaped decoder with a preallocated KV cache."""

    def __init__(self, layers, width, heads, ffn, vocab, device):
        bf16 = dict(device=device, dtype=torch.bfloat16)
        self.heads, self.head_dim = heads, width // heads
        self.embed = torch.randn(vocab, width, **bf16) * 0.02
        self.qkv = [torch.randn(width, 3 * width, **bf16) * 0.02 for _ in range(layers)]
        self.out = [torch.randn(width, width, **bf16) * 0.02 for _ in range(layers)]
        self.gate_up = [torch.randn(width, 2 * ffn, **bf16) * 0.02 for _ in range(layers)]
        self.down = [torch.randn(ffn, width, **bf16) * 0.02 for _ in range(layers)]
        self.lm_head = torch.randn(width, vocab, **bf16) * 0.02
        self.k_cache = self.v_cache = None
        self.attention = "sdpa"

    def cache_bytes(self, batch: int, max_len: int) -> int:
        return 2 * 2 * len(self.qkv) * batch * self.heads * max_len * self.head_dim

    def allocate_cache(self, batch: int, max_len: int) -> None:
        self.k_cache = self.v_cache = None
        torch.cuda.empty_cache()
        shape = (len(self.qkv), batch, self.heads, max_len, self.head_dim)
        self.k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        self.v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def attend(self, q, k, v, causal):
        if self.attention == "flex":
            return compiled_flex_attention()(q, k, v, block_mask=self.block_mask)
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        # Plain batched matmuls: cuBLAS spreads the long key axis over the whole
        # GPU, where SDPA's masked kernels parallelise over the few query rows.
        scores = (q @ k.transpose(-1, -2)).float() * self.head_dim**-0.5
        scores = scores.masked_fill(~causal, float("-inf"))
        return torch.softmax(scores, dim=-1).to(v.dtype) @ v

    def step(self, tokens: torch.Tensor, context: int) -> torch.Tensor:
        """tokens [B, q] at positions context..context+q-1 -> probs [B, q, vocab]."""
        batch, q = tokens.shape
        x = self.embed[tokens]
        end = context + q
        causal = torch.ones(q, end, dtype=torch.bool, device=x.device).tril(context)
        for i in range(len(self.qkv)):
            h = F.rms_norm(x, (x.shape[-1],))
            qkv = (h @ self.qkv[i]).view(batch, q, 3, self.heads, self.head_dim)
            qh, kh, vh = qkv.permute(2, 0, 3, 1, 4)
            self.k_cache[i, :, :, context:end] = kh
            self.v_cache[i, :, :, context:end] = vh
            att = self.attend(qh, self.k_cache[i, :, :, :end], self.v_cache[i, :, :, :end], causal)
            x = x + att.transpose(1, 2).reshape(batch, q, -1) @ self.out[i]
            h = F.rms_norm(x, (x.shape[-1],))
            gate, up = (h @ self.gate_up[i]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ self.down[i]
        logits = F.rms_norm(x, (x.shape[-1],)) @ self.lm_head
        return torch.softmax(logits.float(), dim=-1)


def time_step(model: Decoder, batch: int, q: int, context: int, iters: int) -> float:
    """Median milliseconds of one graphed decode step."""
    tokens = torch.randint(0, model.embed.shape[0], (batch, q), device="cuda")
    if model.attention == "flex":
        model.block_mask = window_block_mask(q, context)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.step(tokens, context)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.step(tokens, context)
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    del graph
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32], help="K values")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8, 32],
                    help="sequences per step (2 = one guided request)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2400, 4160],
                    help="KV length (Lumina-mGPT 1024 px: about 4160 image tokens)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--attention", nargs="+", default=["sdpa", "matmul"], choices=["sdpa", "matmul", "flex"],
                    help="attention kernels to time: SDPA with a mask, plain matmuls, "
                         "or compiled flex_attention (split-key decoding kernel)")
    ap.add_argument("--cache-gib", type=float, default=48.0,
                    help="skip (batch, context) pairs whose KV cache exceeds this")
    ap.add_argument("--out", default="forward_cost_7b.json")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    max_q = max(args.windows) + 1
    model = Decoder(**LUMINA_7B, device="cuda")
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            if model.cache_bytes(batch, context + max_q) > args.cache_gib * 2**30:
                continue
            model.allocate_cache(batch, context + max_q)
            for attention in args.attention:
                model.attention = attention
                base = time_step(model, batch, 1, context, args.iters)
                row = {"attention": attention, "batch": batch, "context": context,
                       "ms_q1": round(base, 3)}
                for k in args.windows:
                    ms = time_step(model, batch, k + 1, context, args.iters)
                    row[f"ms_K{k}"] = round(ms, 3)
                    row[f"ratio_K{k}"] = round(ms / base, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": LUMINA_7B,
        "method": "CUDA-graphed decode step, random bf16 weights, median of "
                  f"{args.iters} replays; probs for all q positions in float32",
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
