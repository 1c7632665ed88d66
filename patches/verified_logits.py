"""Capture the verified (processed) target logits, and their probabilities, of a rejection-sampling step.

Wraps vllm.v1.sample.rejection_sampler.rejection_sample (worker process),
looked up by RejectionSampler.forward as a module global. The probabilities
reach `record_target_probs` from patches/recovered_tokens.py, which wraps the
function rejection_sample hands them to. Checked on vLLM 0.32.0 and 0.33.0.

Why: SJD re-drafts the unverified tail of each window by sampling this step's
p rows, and must report q = those rows exactly as the verifier used them
(after logits processors, temperature, top-k and top-p). They exist only as the
`target_logits` argument of this call; their probabilities, which SJD would
otherwise compute a second time, are recorded too. Outside
`capture_verified_logits()` the wrapper only forwards. Retire when RejectionSampler returns its target probs.
"""

import inspect
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from vllm.v1.sample import rejection_sampler

from vllm_sjd.patches.wrapping import install_wrapper

_original_rejection_sample = rejection_sampler.rejection_sample
_signature = inspect.signature(_original_rejection_sample)
_active = threading.local()


@dataclass
class VerifiedLogits:
    # [num_draft_tokens, V] float32, processed; None if nothing was verified.
    target_logits: torch.Tensor | None = None
    # Their softmax as the verifier used it; None where it computed none (all greedy).
    target_probs: torch.Tensor | None = None


@contextmanager
def capture_verified_logits():
    box = VerifiedLogits()
    _active.box = box
    try:
        yield box
    finally:
        _active.box = None


def _rejection_sample(*args, **kwargs):
    box = getattr(_active, "box", None)
    if box is not None:
        box.target_logits = _signature.bind(*args, **kwargs).arguments["target_logits"]
    return _original_rejection_sample(*args, **kwargs)


def record_target_probs(target_probs: torch.Tensor) -> None:
    """The verifier's softmax of the captured logits (inside capture_verified_logits only)."""
    box = getattr(_active, "box", None)
    if box is not None:
        box.target_probs = target_probs


def install() -> None:
    install_wrapper(rejection_sampler, "rejection_sample", _rejection_sample)
