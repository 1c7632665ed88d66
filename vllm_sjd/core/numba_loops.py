"""The loops of core/cpu_kernels.py, compiled by numba (imported on first use, see there)."""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def inverse_cdf_row(values, residual_of, u):
    """The inverse-CDF draw of core/drafting.sample_inverse_cdf on one row.

    values: the row; with residual_of, the row max(0, values - residual_of),
    falling back to values where that is all zero."""
    width = values.shape[0]
    use_residual = residual_of.shape[0] > 0
    if use_residual:
        mass = 0.0
        for w in range(width):
            x = values[w] - residual_of[w]
            if x > 0:
                mass += x
        use_residual = mass > 0
    total = 0.0
    for w in range(width):
        x = values[w] - residual_of[w] if use_residual else values[w]
        if x > 0:
            total += x
    target, running = u * total, 0.0
    for w in range(width):
        x = values[w] - residual_of[w] if use_residual else values[w]
        if x > 0:
            running += x
        if running > target:
            return w
    return width - 1


@numba.njit(cache=True, nogil=True)
def argmax_row(values):
    best = 0
    for w in range(1, values.shape[0]):
        if values[w] > values[best]:
            best = w
    return best


@numba.njit(cache=True, nogil=True)
def verdict_kernel(p, bonus, n, drafts, q, greedy, accept_u, token_u, max_n):
    """core/verify._verdict in one pass: (tokens [B, max_n + 1], PLACEHOLDER -1 after the
    last; num_accepted [B]). accept_u [T], token_u [T + B] (the bonus rows' numbers last)."""
    batch, total = n.shape[0], p.shape[0]
    tokens = np.full((batch, max_n + 1), -1, np.int64)
    accepted = np.zeros(batch, np.int64)
    none = np.zeros(0, p.dtype)
    first = 0
    for b in range(batch):
        a = 0
        while a < n[b]:
            r, d = first + a, drafts[first + a]
            if greedy[b]:
                if d != argmax_row(p[r]):
                    break
            elif d < 0 or q[r, d] <= 0 or np.float64(p[r, d]) < accept_u[r] * np.float64(q[r, d]):
                break
            tokens[b, a] = d
            a += 1
        accepted[b] = a
        if a < n[b]:  # rejected at row r: the residual, or p where q covers p
            r = first + a
            token = argmax_row(p[r]) if greedy[b] else inverse_cdf_row(p[r], q[r], token_u[r])
        else:  # every draft passed: the bonus row
            token = argmax_row(bonus[b]) if greedy[b] else inverse_cdf_row(bonus[b], none,
                                                                              token_u[total + b])
        tokens[b, a] = token
        first += n[b]
    return tokens, accepted


@numba.njit(cache=True, nogil=True)
def draw_kernel(q, uniforms, coupled, old_drafts, old_q, keep_u, residual_u):
    """core/drafting's inverse-CDF draw per slot of q [B, K, V], with maximal coupling where
    `coupled` (old_q [B, K, V]; empty arrays: independent draws). (drafts, kept) [B, K]."""
    batch, slots = q.shape[0], q.shape[1]
    drafts = np.zeros((batch, slots), np.int64)
    kept = np.zeros((batch, slots), np.bool_)
    none = np.zeros(0, q.dtype)
    for b in range(batch):
        for s in range(slots):
            if coupled.shape[0] > 0 and coupled[b, s]:
                d = old_drafts[b, s]
                q_d = np.float64(old_q[b, s, d])
                if q_d > 0 and keep_u[b, s] * q_d < np.float64(q[b, s, d]):
                    drafts[b, s], kept[b, s] = d, True
                else:
                    drafts[b, s] = inverse_cdf_row(q[b, s], old_q[b, s], residual_u[b, s])
            else:
                drafts[b, s] = inverse_cdf_row(q[b, s], none, uniforms[b, s])
    return drafts, kept
