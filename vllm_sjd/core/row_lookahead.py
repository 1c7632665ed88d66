"""SJD's row lookahead: ZipAR's row-parallel predictions as initial drafts (lossless).

ZipAR (arXiv 2412.04062) observes that an image token depends mostly on the
row above near its column, so the next row can start before the current one
is finished. Under SJD's verification that prediction is used as a proposal
only. Each pass feeds, after the window's drafts (the last at column c of its
image row), min(L, c) tokens at the start of the next image row, at their
raster positions: fed at the row's first positions minus one (the current
row's last cell first), so their rows predict the next row's first cells. A
cell j of the band sees, through causal attention over the feed, everything
committed, the window (the row above up to column c, so c - j codes right of
its cell above) and the band's cells left of it: ZipAR's context with a
window of c - j codes, which grows pass by pass until the window itself
reaches the row.

Those tokens are never verified: the runner hands vLLM's verification the
window's drafts only, so the scheduler counts the lookahead as rejected and
drops its KV. Their rows are kept per cell; when a cell becomes a fresh slot
of the window, its initial draft is an exact sample of the newest kept row,
which is its q. Any q keeps SJD lossless (core/window.py), so the lookahead
can only change how much is accepted, never the output distribution.

What is fed at a lookahead position f: the newest prediction of cell f if
there is one (its most likely token), else the token one row up (f - R),
committed or a draft of the window (for the current row's last cell of a
bare grid, ZipAR's LlamaGen stand-in). Plain numpy, no torch, no vLLM.
"""

import numpy as np

from vllm_sjd.layouts.grid import ImageGrid


def band_cells(grid: ImageGrid | None, prompt_len: int, window_end: int, lookahead: int) -> np.ndarray:
    """Absolute positions of the cells a lookahead predicts this pass.

    The next image row's first min(L, c) cells, where c is the column of the
    window's last draft (at window_end - 1): each band cell then has its cell
    above and at least one code right of it in the feed. None where that
    draft is not in an image row with a next one, or is the row's last cell
    (whose position the band would feed again).
    """
    if grid is None or lookahead <= 0:
        return np.zeros(0, dtype=np.int64)
    stride = grid.row_stride
    body_start = prompt_len + len(grid.header)
    row, col = divmod(window_end - 1 - body_start, stride)
    if window_end - 1 < body_start or row + 1 >= grid.rows or col >= stride - 1:
        return np.zeros(0, dtype=np.int64)
    return body_start + (row + 1) * stride + np.arange(min(lookahead, col), dtype=np.int64)


def fed_tokens(
    cells: np.ndarray,  # [L'] absolute positions the lookahead predicts
    predicted: np.ndarray,  # [L'] newest prediction of each fed position (cell - 1), -1 none
    committed: np.ndarray,  # the request's tokens so far (prompt and output)
    window: list[int],  # the window's scheduled drafts, from position len(committed)
    stride: int,
) -> list[int]:
    """The token fed at each lookahead position cell - 1."""
    tokens = []
    num_tokens = len(committed)
    for cell, guess in zip(cells.tolist(), predicted.tolist()):
        if guess >= 0:
            tokens.append(int(guess))
            continue
        up = cell - 1 - stride
        tokens.append(int(committed[up]) if up < num_tokens else int(window[up - num_tokens]))
    return tokens
