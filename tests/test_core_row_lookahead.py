"""The row lookahead's cells and fed tokens, and fresh slots taking its predictions (plain torch)."""

import numpy as np
import torch

from vllm_sjd.core.row_lookahead import band_cells, fed_tokens
from vllm_sjd.core.window import StepRows, next_window
from vllm_sjd.layouts.grid import ImageGrid

# header of 1, 3 rows of 4 codes + end-of-line (stride 5), trailer of 1: 17 tokens.
GRID = ImageGrid(64, 48, rows=3, cols=4, header=(5,), row_end=7, trailer=(9,),
                 code_low=10, code_high=30)
PROMPT_LEN = 10


BODY = PROMPT_LEN + 1  # absolute position of the first code


def test_band_is_the_next_rows_first_cells_up_to_the_windows_column():
    # Last draft at column 3 of the first row (window_end one past it).
    assert band_cells(GRID, PROMPT_LEN, BODY + 3 + 1, 2).tolist() == [BODY + 5, BODY + 6]
    assert band_cells(GRID, PROMPT_LEN, BODY + 3 + 1, 3).tolist() == [BODY + 5, BODY + 6, BODY + 7]
    # Column 1: one cell (its cell above and one code right of it are in the feed).
    assert band_cells(GRID, PROMPT_LEN, BODY + 1 + 1, 3).tolist() == [BODY + 5]
    assert band_cells(GRID, PROMPT_LEN, BODY + 0 + 1, 3).tolist() == []
    # In the second row, the band is the third row's.
    assert band_cells(GRID, PROMPT_LEN, BODY + 5 + 2 + 1, 2).tolist() == [BODY + 10, BODY + 11]


def test_no_band_at_a_rows_last_cell_in_the_last_row_or_outside_the_image():
    assert band_cells(GRID, PROMPT_LEN, BODY + 4 + 1, 2).tolist() == []  # end-of-line cell
    assert band_cells(GRID, PROMPT_LEN, BODY + 10 + 3 + 1, 2).tolist() == []  # last row
    assert band_cells(GRID, PROMPT_LEN, BODY, 2).tolist() == []  # the header
    assert band_cells(None, PROMPT_LEN, BODY + 4, 2).tolist() == []


def test_fed_tokens_take_the_prediction_else_the_token_one_row_up():
    committed = list(range(100, 120))  # 20 tokens so far: the window starts at 20
    window = [200, 201, 202]  # positions 20, 21, 22
    cells = np.array([24, 25, 28])  # fed at 23, 24, 27: one row up 18, 19, 22
    predicted = np.array([-1, 55, -1])
    assert fed_tokens(cells, predicted, np.array(committed), window, 5) == [118, 55, 202]


def test_fresh_slots_take_the_prediction_and_recycled_slots_keep_their_rows():
    torch.manual_seed(0)
    batch, slots, width = 2, 4, 6
    target = torch.softmax(torch.randn(batch * 2, width), -1)  # n = 2 drafts each
    bonus = torch.softmax(torch.randn(batch, width), -1)
    n = torch.tensor([2, 2])
    a = torch.tensor([2, 0])  # request 0 accepted both: every next slot is fresh
    rows = StepRows(target, bonus, n, a)
    held = torch.tensor([[True, False, True, False], [False, False, False, True]])
    prediction = torch.zeros(batch, slots, width)
    prediction[..., 3] = 1.0  # a prediction certain of token 3
    window = next_window(rows, num_slots=slots, keys=np.array([1, 2]),
                         next_positions=np.array([40, 40]), greedy=torch.tensor([False, False]),
                         initial_drafts="uniform", predicted=(held, prediction))
    # Request 0: slots 0 and 2 fresh and predicted. Request 1 (a = 0): slots 0, 1
    # recycle this pass's rows (rows a+1 = 1 and the bonus), slot 3 fresh and predicted.
    assert window.from_prediction.tolist() == [[True, False, True, False],
                                               [False, False, False, True]]
    assert torch.equal(window.q[0, 0], prediction[0, 0]) and window.drafts[0, 0] == 3
    assert torch.allclose(window.q[0, 1], torch.full((width,), 1 / width))
    assert torch.equal(window.q[1, 0], target[3]) and torch.equal(window.q[1, 1], bonus[1])
    assert window.drafts[1, 3] == 3
