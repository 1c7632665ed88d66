"""A rejected draft whose residual is empty is resampled from p, not replaced by token 0.

Wraps vllm.v1.sample.rejection_sampler.sample_recovered_tokens (worker
process; called by rejection_sample as a module global). Checked on vLLM 0.32.0 and 0.33.0.

Bug: after a rejection the recovered token is argmax(max(p - q, 0) / E).
When q covers p everywhere (p == q up to rounding: a draft rejected because
p(d) fell one float below q(d)), every score is 0 and the kernel returns id 0,
a token p may not allow at all (seen: an image code outside the layout, one
in ~10^5 verified drafts with top-k 2, where SJD's recycled q equals the
verifier's p up to rounding). In exact arithmetic the rejection has
probability 0; resampling from p there is the exact limit. The wrapper zeroes
q on the rows with an empty residual before the original runs, so those rows
sample p with the kernel's own noise (no extra random numbers are drawn).

It also hands the verifier's target probabilities to
patches/verified_logits.py, so SJD does not compute the softmax again.
Retire when vLLM falls back to p on an empty residual.
"""

import inspect

import torch
from vllm.v1.sample import rejection_sampler

from vllm_sjd.patches.verified_logits import record_target_probs
from vllm_sjd.patches.wrapping import install_wrapper

_original_sample_recovered_tokens = rejection_sampler.sample_recovered_tokens
_signature = inspect.signature(_original_sample_recovered_tokens)


def covered_rows(draft_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """[num_tokens] bool: rows where max(p - q, 0) is zero everywhere."""
    return ~(target_probs > draft_probs).any(dim=-1)


def _sample_recovered_tokens(*args, **kwargs):
    bound = _signature.bind(*args, **kwargs)
    target_probs = bound.arguments["target_probs"]
    draft_probs = bound.arguments["draft_probs"]
    record_target_probs(target_probs)
    if draft_probs is not None and draft_probs.shape[0] > 0:
        empty = covered_rows(draft_probs, target_probs)
        if bool(empty.any()):
            bound.arguments["draft_probs"] = draft_probs.masked_fill(empty[:, None], 0.0)
    return _original_sample_recovered_tokens(*bound.args, **bound.kwargs)


def install() -> None:
    install_wrapper(rejection_sampler, "sample_recovered_tokens", _sample_recovered_tokens)
