"""The Jacobi window update of SJD, batched, in plain torch.

Terms, for one request in one step:
- window: the committed last token c and K drafts d_1..d_K after it, verified
  in one forward pass. The pass yields K+1 rows: row j (0 <= j < K) is the
  verified distribution p of the token after d_1..d_j; row K, the bonus row,
  follows d_K.
- accepted prefix: the a drafts the verifier kept (0 <= a <= n, with n <= K
  the drafts scheduled); one more token (resampled at row a, or the bonus
  token at row n when a = n) closes the step.
- re-draft (Jacobi update): the unverified tail's rows a+1..n of this pass are
  sampled to give the next window's first n-a drafts, with q = those rows.
- fresh slots: the remaining K-(n-a) slots get initial drafts.

Every draft is an exact sample from the q returned beside it, so the verifier's
min(1, p/q) test keeps the output distribution equal to the AR distribution
(SJD is lossless) whatever q is; a good q only makes acceptance likelier.
"""

from dataclasses import dataclass
from typing import Literal

import torch

from vllm_sjd.core.rng import window_uniforms

InitialDrafts = Literal["uniform", "last_distribution"]


@dataclass
class StepRows:
    """One step's verified distributions for a batch of B requests."""

    # [sum(n), V] float32: rows 0..n-1 of every request, concatenated in batch
    # order, exactly as the verifier saw them (after logits processors,
    # temperature, top-k, top-p).
    target_probs: torch.Tensor
    # [B, V] float32: each request's bonus row (row n), processed the same way.
    bonus_probs: torch.Tensor
    # [B] int64: drafts scheduled this step (n).
    num_draft_tokens: torch.Tensor
    # [B] int64: drafts accepted this step (a); a = n where nothing was sampled.
    num_accepted: torch.Tensor


def sample_inverse_cdf(
    probs: torch.Tensor,  # [..., V] float, rows summing to 1 (up to rounding)
    uniforms: torch.Tensor,  # [...] float64 in [0, 1)
) -> torch.Tensor:
    """One exact sample per row, [...] int64; zero-probability tokens never win."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    target = (uniforms * cdf[..., -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=probs.shape[-1] - 1)


def next_window(
    rows: StepRows,
    *,
    num_slots: int,
    keys: torch.Tensor,  # [B] int64: per-request drafting keys
    next_positions: torch.Tensor,  # [B] int64: token index of the first new draft
    greedy: torch.Tensor,  # [B] bool: temperature-0 requests
    initial_drafts: InitialDrafts,
    allowed: torch.Tensor | None = None,  # bool, [V] or [B, K, V]; None: all tokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next window of every request: drafts [B, K] int64 and q [B, K, V] float32.

    `allowed` restricts initial drafts per slot (an image layout's forced and
    code-only positions). Recycled slots need no restriction: their rows were
    masked at the same absolute positions before verification.
    For greedy requests the drafts are the argmax of the model's rows (plain
    Jacobi decoding) and q is one-hot, which the greedy verifier ignores.
    """
    batch_size, vocab_size = rows.bonus_probs.shape
    device = rows.bonus_probs.device
    n = rows.num_draft_tokens
    a = rows.num_accepted
    num_target_rows = rows.target_probs.shape[0]

    all_rows = torch.cat([rows.target_probs, rows.bonus_probs], dim=0)
    # [B, 1] index of each request's bonus row in all_rows.
    bonus_row = (torch.arange(batch_size, device=device) + num_target_rows)[:, None]
    first_target_row = (torch.cumsum(n, 0) - n)[:, None]

    slot = torch.arange(num_slots, device=device)[None, :]
    # [B, K] this pass's row that re-drafts each slot of the next window.
    window_row = a[:, None] + 1 + slot
    recycled = window_row <= n[:, None]
    source = torch.where(
        window_row < n[:, None], first_target_row + window_row, bonus_row
    )
    # Fresh slots point at the bonus row: the most recent distribution.
    source = torch.where(recycled, source, bonus_row)
    q = all_rows[source]  # [B, K, V]

    if allowed is None:
        uniform = torch.full((vocab_size,), 1.0 / vocab_size, device=device)
    else:
        weights = allowed.to(torch.float32)
        uniform = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
    if initial_drafts == "last_distribution":
        fresh = q if allowed is None else q * allowed
        total = fresh.sum(dim=-1, keepdim=True)
        # Where the newest row puts no mass on the allowed tokens, go uniform.
        fresh = torch.where(total > 0, fresh / total.clamp_min(1e-30), uniform)
    elif initial_drafts == "uniform":
        fresh = uniform
    else:
        raise ValueError(f"unknown initial_drafts {initial_drafts!r}")
    q = torch.where(recycled[:, :, None], q, fresh)

    u = window_uniforms(keys, next_positions, num_slots)
    drafts = sample_inverse_cdf(q, u)
    if bool(greedy.any()):
        from_model = recycled | (initial_drafts == "last_distribution")
        jacobi = greedy[:, None] & from_model
        drafts = torch.where(jacobi, q.argmax(dim=-1), drafts)
        one_hot = torch.zeros_like(q).scatter_(-1, drafts[:, :, None], 1.0)
        q = torch.where(greedy[:, None, None], one_hot, q)
    return drafts, q.contiguous()
