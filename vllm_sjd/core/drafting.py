"""How a window slot's draft is drawn from its q: three exact samplers.

Every sampler returns, for each slot, a token that is an exact sample of the
q recorded beside it, which is all the verifier's min(1, p/q) test needs.
They differ in how a re-drafted slot relates to the draft the same position
held on the previous pass: the more often the two agree, the less the
context of the later slots churns, and the more of the window is accepted.

- independent (vanilla SJD): inverse CDF with a fresh uniform; two samples
  of a flat distribution almost never agree.
- coupled (MC-SJD / SCD, SJD-PAC's adaptive continuation): maximal coupling
  with the previous draft d ~ q_old. Keep d with probability
  min(1, p(d) / q_old(d)), else sample norm(max(0, p - q_old)); the result
  is an exact sample of p, so the recorded q is p. (Recording q_old for a
  kept draft, as the public SCD code does, is biased.)
- gumbel: argmax(q / E) with Exp(1) noise E fixed per (request, absolute
  position, token): exact for q, and a position keeps its noise from pass to
  pass, so re-drafts agree wherever q moved little.

Why reusing a position's noise (or its previous draft) stays exact: a
position's draft is never verified before the pass that commits it, and
until then it influences only the rows of later positions, never a
committed token or the q of its own position. So at verification the noise
is still independent of everything the verifier conditions on.
"""

from typing import Literal

import numpy as np
import torch

from vllm_sjd.core import cpu_kernels
from vllm_sjd.core.rng import (
    COUPLING_STREAM,
    DRAFT_STREAM,
    RESIDUAL_STREAM,
    token_exponentials,
    window_uniforms,
)

Drafting = Literal["independent", "coupled", "gumbel"]


def _cumulative(probs: torch.Tensor) -> torch.Tensor:
    """float64 running sums along the last axis. In a compiled graph, as an opaque op:
    inductor (torch 2.11, CUDA) fails to build its split scan fused with a reduction."""
    if torch.compiler.is_compiling():
        return _opaque_cumulative(probs)
    return probs.to(torch.float64).cumsum(dim=-1)


@torch.library.custom_op("vllm_sjd::cumulative", mutates_args=())
def _opaque_cumulative(probs: torch.Tensor) -> torch.Tensor:
    return probs.to(torch.float64).cumsum(dim=-1)


@_opaque_cumulative.register_fake
def _(probs: torch.Tensor) -> torch.Tensor:
    return probs.new_empty(probs.shape, dtype=torch.float64)


def sample_inverse_cdf(
    probs: torch.Tensor,  # [..., V] float, rows summing to 1 (up to rounding)
    uniforms: torch.Tensor,  # [...] float64 in [0, 1)
) -> torch.Tensor:
    """One exact sample per row, [...] int64; zero-probability tokens never win."""
    cdf = _cumulative(probs)
    target = (uniforms * cdf[..., -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=probs.shape[-1] - 1)


def maximal_coupling(
    p: torch.Tensor,  # [B, K, V] the new rows
    old_drafts: torch.Tensor,  # [B, K] int64, each an exact sample of old_q
    old_q: torch.Tensor,  # [B, K, V]
    keep_uniforms: torch.Tensor,  # [B, K] float64
    residual_uniforms: torch.Tensor,  # [B, K] float64
    *,
    coupled: torch.Tensor | None = None,  # [B, K] bool: slots that have an old draft
    uniforms: torch.Tensor | None = None,  # [B, K] float64: for the other slots
) -> tuple[torch.Tensor, torch.Tensor]:
    """(drafts, kept): exact samples of p that keep the old draft when they can.

    Slots outside `coupled` get an independent sample of p (with `uniforms`)
    from the same inverse-CDF pass as the residual samples.
    """
    index = old_drafts.clamp(min=0).unsqueeze(-1)
    p_d = p.gather(-1, index).squeeze(-1).to(torch.float64)
    q_d = old_q.gather(-1, index).squeeze(-1).to(torch.float64)
    kept = (q_d > 0) & (keep_uniforms * q_d < p_d)
    residual = (p - old_q).clamp_min_(0.0)
    # p == q_old leaves no residual; then every draft is kept (up to rounding).
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    source = torch.where(empty, p, residual)
    u = residual_uniforms
    if coupled is not None:
        kept &= coupled
        source = torch.where(coupled.unsqueeze(-1), source, p)
        u = torch.where(coupled, residual_uniforms, uniforms)
    fresh = sample_inverse_cdf(source, u)
    return torch.where(kept, old_drafts, fresh), kept


def draw(
    drafting: Drafting,
    q: torch.Tensor,  # [B, K, V]
    *,
    keys: np.ndarray,  # [B] int64, on the host (numpy or a CPU tensor)
    next_positions: np.ndarray,  # [B] int64: absolute index of slot 0, on the host
    previous_drafts: torch.Tensor | None = None,  # [B, K] this position's last draft
    previous_q: torch.Tensor | None = None,  # [B, K, V] the q it was drawn from
    has_previous: torch.Tensor | None = None,  # [B, K] bool
    token_ids: torch.Tensor | None = None,  # [V'] the id of each column of q; None: all
) -> tuple[torch.Tensor, torch.Tensor]:
    """(drafts [B, K] int64, kept [B, K] bool): one exact sample of q per slot.

    Drafts index q's columns. `kept` marks slots whose previous draft was
    kept by the coupling.
    """
    numbers = draw_numbers(drafting, keys, next_positions, q.shape[1], q.device,
                           coupled=previous_drafts is not None)
    return draw_with(drafting, q, numbers, previous_drafts, previous_q, has_previous, token_ids)


def draw_numbers(
    drafting: Drafting,
    keys: np.ndarray,  # [B] int64, on the host
    next_positions: np.ndarray,  # [B] int64, on the host
    num_slots: int,
    device: torch.device,
    coupled: bool,  # a previous window is there to couple with
) -> torch.Tensor:
    """The host-made numbers `draw_with` needs, on `device` in one copy: [B, 1 + K] int64
    keys and positions (gumbel), [3, B, K] float64 uniforms (coupled), else [B, K] float64."""
    keys = np.asarray(keys, dtype=np.int64)
    next_positions = np.asarray(next_positions, dtype=np.int64)
    if drafting == "gumbel":
        positions = next_positions[:, None] + np.arange(num_slots)
        return torch.from_numpy(np.concatenate([keys[:, None], positions], axis=1)).to(device)
    if drafting == "independent" or not coupled:
        return torch.from_numpy(window_uniforms(keys, next_positions, num_slots)).to(device)
    if drafting != "coupled":
        raise ValueError(f"unknown drafting {drafting!r}")
    streams = (DRAFT_STREAM, COUPLING_STREAM, RESIDUAL_STREAM)
    return torch.from_numpy(window_uniforms(keys, next_positions, num_slots, streams)).to(device)


def draw_with(
    drafting: Drafting,
    q: torch.Tensor,  # [B, K, V]
    numbers: torch.Tensor,  # from draw_numbers
    previous_drafts: torch.Tensor | None = None,
    previous_q: torch.Tensor | None = None,
    has_previous: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw`'s tensor work: no host reads (it runs inside compiled graphs). On a CPU
    device the inverse-CDF and coupled draws run as one numba kernel (the same drafts)."""
    if drafting != "gumbel" and cpu_kernels.enabled_for(q):
        if numbers.dim() == 2:
            return cpu_kernels.draw(q, numbers)
        uniforms, keep, residual = numbers
        if has_previous is None:
            has_previous = torch.ones(q.shape[:2], dtype=torch.bool)
        return cpu_kernels.draw(q, uniforms, (previous_drafts, previous_q, keep, residual, has_previous))
    no_keep = torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device)
    if drafting == "gumbel":
        noise = token_exponentials(numbers[:, 0], numbers[:, 1:], q.shape[-1], token_ids)
        return (q / noise).argmax(dim=-1), no_keep
    if numbers.dim() == 2:  # independent, or nothing to couple with
        return sample_inverse_cdf(q, numbers), no_keep
    uniforms, keep, residual = numbers
    return maximal_coupling(
        q, previous_drafts, previous_q, keep, residual, coupled=has_previous, uniforms=uniforms
    )
