#!/usr/bin/env python
"""SJD's step outside the forward pass, at Lumina-mGPT-7B shapes, timed on a GPU.

    python benchmarks/step_overhead_7b.py --out step_overhead_7b.json   # vLLM not needed

benchmarks/forward_cost_7b.py times the forward pass; this times the rest of a
step, running the plugin's own code on synthetic logits:
- the sampling step of patches/sjd_sampling.py (the layout's columns,
  guidance, the layout's masks, temperature, top-k, softmax, core/verify.py);
- the proposer, vllm_sjd/proposer.py (cells above, coupled drafts, initial
  drafts "above", stored windows, the drafts read to the host);
- between them, what patches/sjd_runner.py does on the host (rebuilt here from
  the same LayoutConstraints calls), and the sampled tokens read to the host.
A stand-in holds what vLLM's input batch would. vLLM's own per-step work
(scheduling, input preparation) is not timed. Without vLLM installed (it
cannot be carried to the GPU machine), the two vLLM names sjd_sampling.py
imports are stubbed: the path timed here calls neither.

AR's step is timed as vLLM's sampler runs it for the same batch: float32
logits, guidance, the layout mask, temperature, top-k, softmax, an
exponential-race draw, the tokens read to the host.

Shapes: vocabulary 65536, a 768 px image (48 rows of 48 codes and an
end-of-line; 8194 columns), top-k 2000, temperature 1, guidance 3; P guided
pairs (2P sequences), K drafts each, every request mid-image. Logits are
random (acceptance near zero: the proposer re-drafts whole windows, its
usual case). Each configuration runs --warmup steps, then --iters timed ones
(wall clock, the GPU synchronised before and after), each SJD one with the
tensor work eager and compiled (core/compiled.py, as the SJD runner runs it on
a GPU; the warm-up includes the compilation); the median is reported,
of the whole step and of its sampling part (to the tokens on the host), with
the GPU's kernel time and the number of kernels of one profiled step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vllm_sjd.config import SJD_SETTINGS_CONFIG_KEY  # noqa: E402
from vllm_sjd.core.compiled import set_compiled  # noqa: E402
from vllm_sjd.guidance import guide_pairs  # noqa: E402
from vllm_sjd.layouts.chameleon import ChameleonImageLayout  # noqa: E402
from vllm_sjd.layouts.constraints import LayoutConstraints, image_extra_args  # noqa: E402
from vllm_sjd.proposer import SJDProposer  # noqa: E402

VOCAB = 65536
TOP_K = 2000
GUIDANCE = 3.0
PROMPT_LEN = 64


def load_sampling_mixin():
    """patches/sjd_sampling.py's SJDSamplingMixin, with vLLM's two names stubbed if it is absent."""
    if importlib.util.find_spec("vllm") is None:
        @dataclass
        class SamplerOutput:
            sampled_token_ids: torch.Tensor
            logprobs_tensors: object

        def apply_top_k_top_p(*args, **kwargs):
            raise NotImplementedError("vLLM's top-k/top-p is not on this path")

        names = {"vllm.v1.outputs": {"SamplerOutput": SamplerOutput},
                 "vllm.v1.sample.ops.topk_topp_sampler": {"apply_top_k_top_p": apply_top_k_top_p}}
        for parent in ("vllm", "vllm.v1", "vllm.v1.sample", "vllm.v1.sample.ops"):
            sys.modules[parent] = types.ModuleType(parent)
        for name, attrs in names.items():
            module = sys.modules[name] = types.ModuleType(name)
            module.__dict__.update(attrs)
    spec = importlib.util.spec_from_file_location("sjd_sampling", REPO / "patches" / "sjd_sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SJDSamplingMixin


class StandInRunner(load_sampling_mixin()):
    """What patches/sjd_runner.py hands the sampling step and the proposer, without vLLM."""

    def __init__(self, pairs: int, window: int, device: torch.device):
        num_reqs = 2 * pairs
        self.device = device
        self.req_ids = [f"{'cond' if i % 2 == 0 else 'twin'}-{i // 2}" for i in range(num_reqs)]
        grid = ChameleonImageLayout(768).grid(768, 768)
        self.grid = grid
        self.requests = {
            r: SimpleNamespace(num_prompt_tokens=PROMPT_LEN,
                               sampling_params=SimpleNamespace(seed=i // 2, extra_args=image_extra_args(grid)))
            for i, r in enumerate(self.req_ids)
        }
        self._layouts = LayoutConstraints()
        self.pairs = SimpleNamespace(cond=list(range(0, num_reqs, 2)),
                                     twin=list(range(1, num_reqs, 2)), scale=[GUIDANCE] * pairs)
        config = SimpleNamespace(
            speculative_config=SimpleNamespace(num_speculative_tokens=window),
            additional_config={SJD_SETTINGS_CONFIG_KEY: {
                "num_speculative_tokens": window, "dynamic_num_speculative_tokens": "off"}},
            model_config=SimpleNamespace(max_model_len=8192),
        )
        self.drafter = SJDProposer(config)
        # Requests start at staggered points of the image's first half.
        rng = np.random.default_rng(0)
        start = PROMPT_LEN + rng.integers(100, grid.num_tokens // 2, pairs).repeat(2)
        self.input_batch = SimpleNamespace(
            num_reqs=num_reqs,
            req_ids=self.req_ids,
            num_tokens_no_spec=start.astype(np.int64),
            top_k_cpu=np.full(num_reqs, TOP_K, dtype=np.int64),
            update_async_output_token_ids=lambda: None,
            sampling_metadata=SimpleNamespace(
                max_num_logprobs=None, logprob_token_ids={}, no_penalties=True,
                bad_words_token_ids={}, allowed_token_ids_mask=None,
                thinking_budget_state_holder=None,
                logitsprocs=SimpleNamespace(non_argmax_invariant=[]),
                temperature=torch.ones(num_reqs, device=device),
                top_k=torch.full((num_reqs,), TOP_K, device=device),
                top_p=None,
            ),
        )
        self.drafts: list[list[int]] = [[] for _ in self.req_ids]

    def _layout_entries(self, req_ids):
        return self._layouts.lookup(
            req_ids,
            lambda r: self.requests[r].sampling_params.extra_args,
            lambda r: self.requests[r].num_prompt_tokens,
        )

    def _guide(self, logits, pairs, counts: np.ndarray) -> None:
        num_reqs = self.input_batch.num_reqs
        guide_pairs(logits, list(zip(pairs.cond, pairs.twin, pairs.scale)), counts,
                    self.input_batch.num_tokens_no_spec[:num_reqs], self._layout_entries(self.req_ids))

    def spec_metadata(self):
        """The drafts vLLM would schedule (on the device, as its input preparation leaves them)."""
        n = np.array([len(d) for d in self.drafts], dtype=np.int64)
        counts = n + 1
        first_row = np.cumsum(counts) - counts
        target = np.concatenate([np.arange(f, f + k) for f, k in zip(first_row, n)])
        draft_ids = [t for d in self.drafts for t in d]
        to = lambda x: torch.as_tensor(np.asarray(x, dtype=np.int64), device=self.device)  # noqa: E731
        return SimpleNamespace(target_logits_indices=to(target), bonus_logits_indices=to(first_row + n),
                               num_draft_tokens=n.tolist(), draft_token_ids=to(draft_ids)), counts

    def step(self, logits: torch.Tensor, metadata, counts: np.ndarray) -> None:
        """One SJD step after the forward pass: sample and verify, then propose."""
        num_reqs = self.input_batch.num_reqs
        greedy = np.zeros(num_reqs, dtype=bool)
        output, rows = self._sample_on_columns(logits, metadata, counts, self.pairs, greedy)
        sampled = [[t for t in row if t >= 0] for row in output.sampled_token_ids.tolist()]
        self.sampled_at = time.perf_counter()  # the read above waited for the GPU
        n_host = np.asarray(metadata.num_draft_tokens, dtype=np.int64)
        a_host = np.array([len(t) - 1 for t in sampled], dtype=np.int64)
        rows = replace(rows, num_draft_tokens=torch.from_numpy(n_host).to(self.device),
                       num_accepted=torch.from_numpy(a_host).to(self.device), host_counts=(n_host, a_host))
        self.input_batch.num_tokens_no_spec += a_host + 1
        num_tokens = self.input_batch.num_tokens_no_spec.copy()
        entries = self._layout_entries(self.req_ids)
        columns = self._layouts.columns(entries, VOCAB, self.device)
        num_slots = self.drafter.num_slots
        allowed = self._layouts.row_masks(entries, num_tokens, np.full(num_reqs, num_slots), VOCAB,
                                          self.device, columns)
        above, strides = self._layouts.cells_above(entries, num_tokens, num_slots)
        self.drafts = self.drafter.propose_window(
            self.req_ids, rows, num_tokens=num_tokens, above=above, row_strides=strides,
            seeds=[self.requests[r].sampling_params.seed for r in self.req_ids],
            greedy=greedy, has_output=[True] * num_reqs,
            allowed=allowed.view(num_reqs, num_slots, -1),
            mirror=list(zip(self.pairs.twin, self.pairs.cond)), columns=columns, grids=entries,
        )
        # Back to the image's first half once a request nears its end.
        late = self.input_batch.num_tokens_no_spec > PROMPT_LEN + self.grid.num_tokens - 4 * num_slots
        self.input_batch.num_tokens_no_spec[late] -= self.grid.num_tokens // 2


def ar_step(logits: torch.Tensor, runner: StandInRunner) -> list[int]:
    """AR's sampling as vLLM's sampler does it, with the plugin's guidance and layout mask."""
    num_reqs = runner.input_batch.num_reqs
    counts = np.ones(num_reqs, dtype=np.int64)
    scores = logits.float()
    runner._guide(scores, runner.pairs, counts)
    entries = runner._layout_entries(runner.req_ids)
    mask = runner._layouts.row_masks(entries, runner.input_batch.num_tokens_no_spec, counts,
                                     VOCAB, logits.device)
    scores.masked_fill_(~mask, float("-inf"))
    scores.div_(runner.input_batch.sampling_metadata.temperature[:, None])
    kth = scores.topk(TOP_K, dim=-1).values[:, -1:]
    scores.masked_fill_(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32)
    tokens = probs.div_(torch.empty_like(probs).exponential_()).argmax(dim=-1)
    runner.input_batch.num_tokens_no_spec += 1
    late = runner.input_batch.num_tokens_no_spec > PROMPT_LEN + runner.grid.num_tokens - 2
    runner.input_batch.num_tokens_no_spec[late] -= runner.grid.num_tokens // 2
    return tokens.tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_config(pairs: int, window: int, compiled: bool, args, device) -> dict:
    """Median wall ms of a step's non-forward work; window 0 is AR."""
    set_compiled(compiled)
    torch.manual_seed(0)
    runner = StandInRunner(pairs, max(window, 1), device)
    rows = 2 * pairs * (window + 1)
    pool = [torch.randn(rows, VOCAB, device=device, dtype=torch.bfloat16) * 4 for _ in range(4)]

    sampling = []  # ms to the sampled tokens on the host (SJD)

    def one(i: int) -> float:
        logits = pool[i % len(pool)]
        if window == 0:
            synchronize(device)
            start = time.perf_counter()
            ar_step(logits, runner)
        else:
            metadata, counts = runner.spec_metadata()  # the first step has no drafts yet
            logits = logits[: int(counts.sum())]
            synchronize(device)
            start = time.perf_counter()
            runner.step(logits, metadata, counts)
            sampling.append((runner.sampled_at - start) * 1e3)
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    start = time.perf_counter()
    for i in range(args.warmup):
        one(i)
    warmup_s = time.perf_counter() - start
    times = [one(i) for i in range(args.iters)]
    row = {"pairs": pairs, "window": window, "compiled": compiled,
           "ms": round(statistics.median(times), 3), "ms_min": round(min(times), 3),
           "warmup_s": round(warmup_s, 1)}
    if window:
        row["sampling_ms"] = round(statistics.median(sampling[-args.iters:]), 3)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            one(args.iters)
        averages = prof.key_averages()
        row["gpu_kernel_ms"] = round(sum(e.self_device_time_total for e in averages) / 1e3, 3)
        row["kernels"] = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[1, 4, 16], help="guided requests in flight")
    ap.add_argument("--windows", type=int, nargs="+", default=[0, 16, 32, 64], help="K; 0 is AR")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compiled", nargs="+", choices=["off", "on"], default=["off", "on"],
                    help="the step's tensor work eager, compiled (core/compiled.py), or both")
    ap.add_argument("--out", default="step_overhead_7b.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for pairs in args.pairs:
        for window in args.windows:
            for compiled in args.compiled if window else ["off"]:
                try:
                    rows.append(time_config(pairs, window, compiled == "on", args, device))
                except Exception as error:  # a compiler failure ends one configuration, not the run
                    rows.append({"pairs": pairs, "window": window, "compiled": compiled == "on",
                                 "error": f"{type(error).__name__}: {str(error)[:300]}"})
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {"vocab": VOCAB, "top_k": TOP_K, "image": "768 px, 48 x 49 tokens"},
        "method": f"median wall ms of {args.iters} steps after {args.warmup}; "
                  "the plugin's sampling step and proposer on random logits",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
