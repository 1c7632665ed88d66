"""The loops of core/cpu_kernels.py, compiled by numba (imported on first use, see there)."""

import numba
import numpy as np


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11))


@numba.njit(cache=True, inline="always")
def splitmix64(x):
    x = x + _GOLDEN
    x = (x ^ (x >> _SHIFTS[0])) * _MUL1
    x = (x ^ (x >> _SHIFTS[1])) * _MUL2
    return x ^ (x >> _SHIFTS[2])


@numba.njit(cache=True, inline="always")
def uniform(key, position, slot, stream):
    """core/rng.counter_uniforms of one (key, position, slot, stream), uint64 bit patterns."""
    x = splitmix64(splitmix64((key ^ stream) ^ splitmix64(position)) + slot)
    return np.float64(x >> _SHIFTS[3]) * (1.0 / 9007199254740992.0)


@numba.vectorize(["float64(uint64, uint64, uint64, uint64)"], cache=True)
def counter_uniform(key, position, slot, stream):
    """core/rng.counter_uniforms as a broadcasting ufunc: the same bits."""
    return uniform(key, position, slot, stream)


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


@numba.njit(cache=True, inline="always")
def coupled_draw(p_row, old_row, d, keep_u, residual_u):
    """core/drafting.maximal_coupling on one slot: keep the old draft d (drawn from old_row)
    while keep_u q_old(d) < p(d), else draw from max(0, p - q_old). (draft, kept)."""
    q_d = np.float64(old_row[d])
    if q_d > 0 and keep_u * q_d < np.float64(p_row[d]):
        return d, True
    return inverse_cdf_row(p_row, old_row, residual_u), False


@numba.njit(cache=True, nogil=True)
def argmax_row(values):
    best = 0
    for w in range(1, values.shape[0]):
        if values[w] > values[best]:
            best = w
    return best


@numba.njit(cache=True, nogil=True)
def verdict_kernel(p, bonus, n, drafts, q, greedy, keys, first, streams, max_n):
    """core/verify.verify's test in one pass: (tokens [B, max_n + 1], PLACEHOLDER -1 after
    the last; num_accepted [B]). keys, first (each request's position of row 0) and
    streams (acceptance, token) as uint64 bit patterns: the numbers are hashed here."""
    batch = n.shape[0]
    tokens = np.full((batch, max_n + 1), -1, np.int64)
    accepted = np.zeros(batch, np.int64)
    none = np.zeros(0, p.dtype)
    zero = np.uint64(0)
    row = 0
    for b in range(batch):
        a = 0
        while a < n[b]:
            r, d = row + a, drafts[row + a]
            if greedy[b]:
                if d != argmax_row(p[r]):
                    break
            else:
                u = uniform(keys[b], first[b] + np.uint64(a), zero, streams[0])
                if d < 0 or q[r, d] <= 0 or np.float64(p[r, d]) < u * np.float64(q[r, d]):
                    break
            tokens[b, a] = d
            a += 1
        accepted[b] = a
        if greedy[b]:
            token = argmax_row(p[row + a]) if a < n[b] else argmax_row(bonus[b])
        else:
            # The token uniform of position first + a: the rejected draft's, or the bonus one's.
            u = uniform(keys[b], first[b] + np.uint64(a), zero, streams[1])
            if a < n[b]:  # rejected at row a: the residual, or p where q covers p
                token = inverse_cdf_row(p[row + a], q[row + a], u)
            else:  # every draft passed: the bonus row
                token = inverse_cdf_row(bonus[b], none, u)
        tokens[b, a] = token
        row += n[b]
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
                drafts[b, s], kept[b, s] = coupled_draw(q[b, s], old_q[b, s], old_drafts[b, s],
                                                        keep_u[b, s], residual_u[b, s])
            else:
                drafts[b, s] = inverse_cdf_row(q[b, s], none, uniforms[b, s])
    return drafts, kept


@numba.njit(cache=True, nogil=True)
def window_kernel(target, bonus, layout, from_cells_above, table, table_rows, held, above_rows,
                  previous_drafts, previous_q, present, keys, positions, streams, greedy):
    """core/window._window_tensors for initial drafts "uniform" or "above" and independent or
    coupled draws, in one pass. A fresh slot's stand-in q is table[table_rows[b, s]]; held
    [B, K] and above_rows [B, K, V] (empty: no cells above); previous_* (empty: no
    coupling); keys, positions (of slot 0) and streams (draft, coupling, residual) as uint64
    bit patterns: the numbers core/drafting.draw_numbers makes are hashed here; greedy [B].
    Returns (drafts, q, kept, fresh, from_above, old_q) with old_q [B, K, V] (empty: none)."""
    batch, slots, width = layout.shape[1], layout.shape[2], bonus.shape[1]
    total = target.shape[0]
    coupled = previous_drafts.shape[0] > 0
    with_above = from_cells_above and held.shape[0] > 0
    q = np.empty((batch, slots, width), np.float32)
    old_q = np.empty((batch if coupled else 0, slots, width), np.float32)
    drafts = np.zeros((batch, slots), np.int64)
    kept = np.zeros((batch, slots), np.bool_)
    fresh = np.zeros((batch, slots), np.bool_)
    from_above = np.zeros((batch, slots), np.bool_)
    none = np.zeros(0, np.float32)
    for b in range(batch):
        for s in range(slots):
            source, recycled = layout[0, b, s], layout[1, b, s] != 0
            row = target[source] if source < total else bonus[source - total]
            from_model = False
            if not recycled:
                fresh[b, s] = True
                if with_above and layout[3, b, s] != 0:  # the cell above is a recycled slot here
                    above_source = layout[0, b, layout[2, b, s]]
                    row = target[above_source] if above_source < total else bonus[above_source - total]
                    from_model = True
                elif with_above and held[b, s]:
                    row = above_rows[b, s]
                    from_model = True
                else:
                    row = table[table_rows[b, s]]
                from_above[b, s] = from_model
            q[b, s] = row
            old_slot = layout[4, b, s]
            d = -1
            if coupled:
                index = max(old_slot, 0)
                old_q[b, s] = previous_q[b, index]
                if present[b] and old_slot >= 0:
                    d = previous_drafts[b, index]
            key, position, slot = keys[b], positions[b], np.uint64(s)
            if greedy[b] and (recycled or from_model):
                drafts[b, s] = argmax_row(q[b, s])
            elif d >= 0:  # maximal coupling with the draft this position had
                drafts[b, s], kept[b, s] = coupled_draw(
                    q[b, s], old_q[b, s], d, uniform(key, position, slot, streams[1]),
                    uniform(key, position, slot, streams[2]))
            else:
                u = uniform(key, position, slot, streams[0])
                drafts[b, s] = inverse_cdf_row(q[b, s], none, u)
            if greedy[b]:
                kept[b, s] = False
                q[b, s] = 0.0
                q[b, s, drafts[b, s]] = 1.0
    return drafts, q, kept, fresh, from_above, old_q



@numba.njit(cache=True, nogil=True)
def slot_layout(n, a, num_slots, above_positions, first_slot):
    """core/window._slot_layout in one loop (the same [5, B, K] int64; above_positions
    [B, K], or [0, 0] for none)."""
    batch = n.shape[0]
    num_target_rows = 0
    for b in range(batch):
        num_target_rows += n[b]
    layout = np.zeros((5, batch, num_slots), np.int64)
    first_target_row = 0
    for b in range(batch):
        bonus_row = num_target_rows + b
        for s in range(num_slots):
            row = a[b] + 1 + s
            recycled = row <= n[b]
            layout[0, b, s] = first_target_row + row if recycled and row < n[b] else bonus_row
            layout[1, b, s] = recycled
            layout[4, b, s] = row if recycled and row < num_slots else -1
        if above_positions.shape[0] > 0:
            for s in range(num_slots):
                position = above_positions[b, s]
                slot_above = position - first_slot[b]
                index = min(max(slot_above, 0), num_slots - 1)
                layout[2, b, s] = index
                layout[3, b, s] = position >= 0 and slot_above >= 0 and a[b] + 1 + index <= n[b]
        first_target_row += n[b]
    return layout


@numba.njit(cache=True, nogil=True)
def ring_record(ring_rows, ring_positions, rings, strides, positions, first, second, sources):
    """core/cells_above.CellsAbove.record's writes in one loop: each entry's row of
    cat(first, second) at its position in its ring, where it is among its request's newest
    `stride`."""
    newest = np.full(ring_rows.shape[0], -1, np.int64)
    for i in range(rings.shape[0]):
        newest[rings[i]] = max(newest[rings[i]], positions[i])
    for i in range(rings.shape[0]):
        ring, stride = rings[i], strides[i]
        if positions[i] > newest[ring] - stride:
            slot = positions[i] % stride
            ring_positions[ring, slot] = positions[i]
            source = sources[i]
            if source < first.shape[0]:
                ring_rows[ring, slot] = first[source]
            else:
                ring_rows[ring, slot] = second[source - first.shape[0]]


@numba.njit(cache=True, nogil=True)
def ring_lookup(ring_rows, ring_positions, rings, strides, above):
    """core/cells_above.CellsAbove.lookup in one loop: (found [B, K], rows [B, K, W])."""
    batch, slots = above.shape[0], above.shape[1]
    found = np.zeros((batch, slots), np.bool_)
    rows = np.empty((batch, slots, ring_rows.shape[2]), ring_rows.dtype)
    for b in range(batch):
        ring = max(rings[b], 0)
        for s in range(slots):
            slot = max(above[b, s], 0) % strides[b]
            wanted = above[b, s] if rings[b] >= 0 and above[b, s] >= 0 else -2
            found[b, s] = ring_positions[ring, slot] == wanted
            rows[b, s] = ring_rows[ring, slot]
    return found, rows


@numba.njit(cache=True, nogil=True)
def run_positions(starts, counts, limit):
    """For each request its counts[i] positions starts[i], starts[i] + 1, ..., clipped to
    [0, limit], concatenated: [sum(counts)] int64 (core layouts' table rows)."""
    total = 0
    for i in range(counts.shape[0]):
        total += counts[i]
    rows = np.empty(total, np.int64)
    k = 0
    for i in range(counts.shape[0]):
        for j in range(counts[i]):
            rows[k] = min(max(starts[i] + j, 0), limit)
            k += 1
    return rows


@numba.njit(cache=True, nogil=True)
def cells_above(starts, grids, num_slots):
    """layouts/constraints.LayoutConstraints.cells_above's positions in one loop: [B, K] the
    absolute position of each slot's code one image row up, -1 none. grids: [B, 5] each
    request's prompt length and its grid's header length, row stride (0: no grid), rows
    and columns."""
    above = np.full((starts.shape[0], num_slots), -1, np.int64)
    for b in range(starts.shape[0]):
        prompt_len, header, stride, rows, cols = grids[b]
        if stride == 0:
            continue
        for s in range(num_slots):
            body = starts[b] - prompt_len + s - header
            if stride <= body < rows * stride and body % stride < cols:
                above[b, s] = starts[b] + s - stride
    return above


@numba.njit(cache=True, nogil=True)
def committed_entries(n, a, num_tokens, include, num_target_rows):
    """core/window.committed_row_sources for the requests in `include`, flattened: each
    committed token's (request, absolute position, row of cat(target, bonus))."""
    total = 0
    for i in range(n.shape[0]):
        if include[i]:
            total += min(a[i] + 1, n[i]) + (a[i] == n[i])
    request = np.empty(total, np.int64)
    positions = np.empty(total, np.int64)
    sources = np.empty(total, np.int64)
    k, first = 0, 0
    for i in range(n.shape[0]):
        if include[i]:
            count = min(a[i] + 1, n[i]) + (a[i] == n[i])
            for j in range(count):
                request[k] = i
                positions[k] = num_tokens[i] - count + j
                sources[k] = first + j if j < min(a[i] + 1, n[i]) else num_target_rows + i
                k += 1
        first += n[i]
    return request, positions, sources


@numba.njit(cache=True, nogil=True)
def add_table_rows(values, table, rows):
    """values[r] += table[rows[r]] in place (a layout's penalty rows on a step's scores)."""
    for r in range(values.shape[0]):
        values[r] += table[rows[r]]
