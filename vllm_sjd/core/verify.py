"""SJD's verification step in plain torch: accept, resample, bonus, on any set of columns.

For one request in one step: drafts d_1..d_n with the q each was drawn from,
and the n+1 rows p the pass computed (row j verifies d_{j+1}; row n is the
bonus row). Draft j is accepted with probability min(1, p_j(d_j) / q_j(d_j));
at the first rejection a token is drawn from norm(max(0, p_j - q_j)) (from p_j
itself where q_j covers p_j, which the rejection had probability 0 to reach in
exact arithmetic) and the step ends; if every draft passes, a bonus token is
drawn from row n. A greedy request accepts a draft equal to argmax p_j and
closes with an argmax. This is vLLM's rejection sampler (the same test, the
same comparisons), without its vocabulary-wide passes.

Random numbers are counter-based (core/rng.py), keyed by the request's key
and the absolute position of the token they decide: the acceptance uniform of
the draft at position t and the uniform of the token drawn at t. Each position's
token is decided in exactly one step (accepted, resampled or bonus; a step
whose result is discarded decides nothing), so no number is used twice, and
they are independent of the drafting streams. A seeded request draws the
same numbers in any batch.

Every [..., W] input may hold only some vocabulary columns (core/columns.py):
with zero probability on the others, every test and draw gives the same token.
"""

from dataclasses import dataclass

import numpy as np
import torch

from vllm_sjd.core import cpu_kernels
from vllm_sjd.core.compiled import compiled_when_enabled
from vllm_sjd.core.drafting import sample_inverse_cdf
from vllm_sjd.core.rng import ACCEPT_STREAM, TOKEN_STREAM, counter_uniforms

PLACEHOLDER = -1  # vLLM's placeholder for the slots after a request's last token


@dataclass
class Verdict:
    tokens: torch.Tensor  # [B, max_n + 1] int64 column indices, PLACEHOLDER after the last
    num_accepted: torch.Tensor  # [B] int64: drafts accepted (a <= n)


def verify(
    target_probs: torch.Tensor,  # [T, W] float32: rows 0..n-1 of every request, in batch order
    bonus_probs: torch.Tensor,  # [B, W] float32: each request's row n
    num_draft_tokens: np.ndarray,  # [B] int64 (n), on the host
    max_num_drafts: int,  # max(n)
    drafts: torch.Tensor,  # [T] int64 column index of each draft; -1: none (rejected)
    draft_q: torch.Tensor,  # [T, W] float32: the q each draft was drawn from
    greedy: torch.Tensor,  # [B] bool
    keys: np.ndarray,  # [B] int64: per-request random keys, on the host
    first_positions: np.ndarray,  # [B] int64 on the host: absolute index of the token row 0 decides
    any_greedy: bool | None = None,  # whether `greedy` has a True, known on the host
) -> Verdict:
    """Host inputs are numpy (CPU tensors also do): the random numbers are hashed
    there (core/rng.py) and sent with the counts in one copy each. On a CPU
    device the test runs as one numba kernel (core/cpu_kernels.py), same tokens."""
    n_host = np.asarray(num_draft_tokens, dtype=np.int64)
    keys, first = np.asarray(keys, dtype=np.int64), np.asarray(first_positions, dtype=np.int64)
    if cpu_kernels.enabled_for(bonus_probs):  # one pass; it hashes the same numbers itself
        return Verdict(*cpu_kernels.verdict(target_probs, bonus_probs, n_host, max_num_drafts, drafts,
                                            draft_q, greedy, keys, first))
    any_greedy = bool(greedy.any()) if any_greedy is None else any_greedy
    batch_size = bonus_probs.shape[0]
    device = bonus_probs.device
    total = target_probs.shape[0]

    # Every number the step may use, in one hash: the acceptance uniform of
    # each draft's position, and the token uniform of every position a step
    # may close at (a draft's, where it is rejected; the bonus position).
    if total == 0:
        # No drafts in the batch (a plain AR step): every request closes with
        # its bonus token, drawn from the same number the full test would use.
        numbers = counter_uniforms(keys, first, 0, np.array([TOKEN_STREAM], dtype=np.int64))
        tokens = _bonus_tokens(bonus_probs, greedy, torch.from_numpy(numbers).to(device), any_greedy)
        return Verdict(tokens[:, None], torch.zeros(batch_size, dtype=torch.int64, device=device))
    host_request = np.repeat(np.arange(batch_size), n_host)
    first_row = np.cumsum(n_host) - n_host
    host_slot = np.arange(total) - first_row[host_request]
    row_keys = np.concatenate([keys[host_request], keys])
    row_positions = np.concatenate([first[host_request] + host_slot, first + n_host])
    streams = np.array([[ACCEPT_STREAM], [TOKEN_STREAM]], dtype=np.int64)
    numbers = torch.from_numpy(counter_uniforms(row_keys, row_positions, 0, streams)).to(device)
    # The layout, on the host: request and slot of every draft; n, the first
    # row and the bonus number's index of every request.
    rows = torch.from_numpy(np.stack([host_request, host_slot])).to(device)
    requests = np.stack([n_host, first_row, total + np.arange(batch_size)])
    tokens, num_accepted = _verdict(
        target_probs, bonus_probs, rows, torch.from_numpy(requests).to(device), max_num_drafts,
        drafts, draft_q, greedy, any_greedy, numbers,
    )
    return Verdict(tokens, num_accepted)


@compiled_when_enabled
def _verdict(
    target_probs: torch.Tensor,  # [T, W]
    bonus_probs: torch.Tensor,  # [B, W]
    rows: torch.Tensor,  # [2, T] int64: request and slot of each row
    requests: torch.Tensor,  # [3, B] int64: n, first row, index of the bonus row's number
    max_num_drafts: int,
    drafts: torch.Tensor,  # [T] int64
    draft_q: torch.Tensor,  # [T, W]
    greedy: torch.Tensor,  # [B] bool
    any_greedy: bool,
    numbers: torch.Tensor,  # [2, T + B] float64: acceptance and token uniforms
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, max_n + 1], num_accepted [B]): the test and the closing token, tensors only."""
    batch_size = bonus_probs.shape[0]
    device = bonus_probs.device
    total = target_probs.shape[0]
    request_of_row, slot = rows.unbind(0)
    n, first_row, bonus_number = requests.unbind(0)
    u, token_uniforms = numbers[0, :total], numbers[1]

    # The acceptance test, row by row.
    index = drafts.clamp(min=0)[:, None]
    p_d = target_probs.gather(1, index)[:, 0].to(torch.float64)
    q_d = draft_q.gather(1, index)[:, 0].to(torch.float64)
    accepted = (drafts >= 0) & (q_d > 0) & (p_d >= u * q_d)
    if total and any_greedy:
        target_argmax = target_probs.argmax(dim=-1)
        accepted = torch.where(greedy[request_of_row], drafts == target_argmax, accepted)

    # a = the accepted prefix: the slot of the first rejection, or n.
    num_accepted = n.scatter_reduce(
        0, request_of_row, slot.masked_fill(accepted, max_num_drafts), "amin"
    )
    rejected = num_accepted < n

    # One more token: resampled at row a after a rejection, else the bonus token.
    closing_row = torch.where(rejected, first_row + num_accepted, bonus_number)
    if total:
        row = closing_row.clamp(max=total - 1)
        p_rejected, q_rejected = target_probs[row], draft_q[row]
        residual = (p_rejected - q_rejected).clamp_min(0.0)
        # Where q covers p there is no residual: draw from p.
        covered = residual.sum(dim=-1, keepdim=True) <= 0
        residual = torch.where(covered, p_rejected, residual)
        source = torch.where(rejected[:, None], residual, bonus_probs)
    else:
        source = bonus_probs
    token = sample_inverse_cdf(source, token_uniforms[closing_row])
    if any_greedy:
        closing = bonus_probs if not total else torch.where(rejected[:, None], p_rejected, bonus_probs)
        token = torch.where(greedy, closing.argmax(dim=-1), token)

    # Accepted drafts in place, PLACEHOLDER after; a scatter, no boolean
    # indexing (that would read the mask back to the host).
    tokens = torch.full(
        (batch_size, max_num_drafts + 1), PLACEHOLDER, dtype=torch.int64, device=device
    )
    keep = slot < num_accepted[request_of_row]
    tokens[request_of_row, slot] = torch.where(keep, drafts, PLACEHOLDER)
    tokens[torch.arange(batch_size, device=device), num_accepted] = token
    return tokens, num_accepted


def _bonus_tokens(bonus_probs: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor,
                  any_greedy: bool = True):
    """[B] int64: a token from each bonus row (argmax for greedy requests)."""
    sampled = sample_inverse_cdf(bonus_probs, uniforms)
    return torch.where(greedy, bonus_probs.argmax(dim=-1), sampled) if any_greedy else sampled


def one_hot_q(drafts: torch.Tensor, width: int) -> torch.Tensor:
    """[T, width] float32: the q of drafts that carry no distribution (-1: an empty row)."""
    q = torch.zeros(drafts.shape[0], width, dtype=torch.float32, device=drafts.device)
    valid = (drafts >= 0).to(torch.float32)[:, None]
    return q.scatter_(1, drafts.clamp(min=0)[:, None], valid)
