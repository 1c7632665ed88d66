"""ZipAR's stream order (core/zipar.py), without an engine."""

import random

import pytest

from vllm_sjd.core.zipar import NO_TARGET, ZipARStream, raster_tokens, stream_order
from vllm_sjd.layouts.grid import ImageGrid

# The demo's layout (16 x 16 codes, end-of-line, end-of-image) and a bare grid
# (LlamaGen, Janus) of the same size; a small grid with a header and a trailer.
WITH_EOL = ImageGrid(64, 64, 16, 16, (), 8803, (8196,), 4, 8196)
BARE = ImageGrid(64, 64, 16, 16, (), None, (), 4, 8196)
HEADED = ImageGrid(32, 32, 4, 5, (1, 2, 3), 9, (8, 7), 10, 50)
GRIDS = [WITH_EOL, BARE, HEADED]


@pytest.mark.parametrize("grid", GRIDS, ids=["eol", "bare", "header"])
def test_w_equal_to_the_row_is_raster_order(grid):
    order = stream_order(grid, grid.cols, 64)
    assert list(order.positions) == list(range(grid.num_tokens))


@pytest.mark.parametrize("grid", GRIDS, ids=["eol", "bare", "header"])
@pytest.mark.parametrize("window", [1, 2, 3, 4, 8])
def test_every_position_once_and_stand_ins_before_their_real_token(grid, window):
    order = stream_order(grid, window, 64)
    positions = list(order.positions)
    assert sorted(set(positions)) == list(range(grid.num_tokens))
    repeated = {p for p in positions if positions.count(p) > 1}
    if grid.row_end is not None:
        assert not repeated  # rows start from their end-of-line token: no stand-ins
    else:
        # One stand-in per row that starts before the row above is done.
        overlapping_rows = grid.rows - 1 if window < grid.cols else 0
        assert len(positions) - grid.num_tokens == overlapping_rows
        assert all(positions.count(p) == 2 for p in repeated)
    assert positions[-1] == grid.num_tokens - 1


def test_forward_passes_of_the_demo_grid():
    # The figure for scale: at W = 4 about 78 passes against AR's 273.
    passes = {w: stream_order(WITH_EOL, w, 64).forward_passes for w in (4, 8, 16)}
    assert passes[4] == 77
    assert passes[4] < passes[8] < passes[16] <= WITH_EOL.num_tokens
    # W = 16 feeds each end-of-line in the pass of the code before it.
    assert passes[16] == WITH_EOL.num_tokens - WITH_EOL.rows


def test_a_row_starts_when_the_row_above_has_w_codes():
    grid, window = BARE, 4
    stream = ZipARStream(grid, window, 64)
    stream.record(0, 7)
    step_of = {}
    for step in range(200):
        feeds = stream.plan()
        for feed in feeds:
            if feed.target != NO_TARGET:
                step_of.setdefault(feed.target, step)
                stream.record(feed.target, 7)
        if stream.known(grid.num_tokens - 1):
            break
    for row in range(1, grid.rows):
        # Row r's first code is drawn in the pass that draws row r-1's (W+1)-th.
        assert step_of[stream.cell(row, 0)] == step_of[stream.cell(row - 1, window)]


def test_the_cap_on_feeds_delays_rows_but_keeps_every_token():
    wide = stream_order(WITH_EOL, 1, 64)
    capped = stream_order(WITH_EOL, 1, 4)
    assert sorted(capped.positions) == sorted(wide.positions)
    assert capped.forward_passes > wide.forward_passes


@pytest.mark.parametrize("grid", GRIDS, ids=["eol", "bare", "header"])
def test_the_order_does_not_depend_on_how_steps_are_cut(grid):
    """A step that runs fewer feeds than planned (a token budget, a preemption)
    leaves the stream order unchanged: the rest are planned again first."""
    reference = stream_order(grid, 3, 64).positions
    rng = random.Random(0)
    stream = ZipARStream(grid, 3, 64)
    if stream.target_of(-1) == 0:
        stream.record(0, 5)
    ran = 0  # feeds run so far
    stream.advance(ran)
    last = grid.num_tokens - 1
    while not any(f.position == last and f.source == last for f in stream.stream):
        pending = stream.stream[ran:]
        run = rng.randint(1, len(pending))  # the scheduler runs only some of them
        for feed in pending[:run]:
            if feed.target != NO_TARGET:
                stream.record(feed.target, 5)
        ran += run
        stream.advance(ran)
    positions = [f.position for f in stream.stream]
    assert tuple(positions[: len(reference)]) == reference


def test_raster_tokens_reads_the_real_token_not_its_stand_in():
    order = stream_order(BARE, 4, 64)
    truth = list(range(100, 100 + BARE.num_tokens))
    # The engine's output: each feed carries the token of its source (a
    # stand-in carries the newest code of its row at the time).
    stream = ZipARStream(BARE, 4, 64)
    stream.record(0, truth[0])
    while len(stream.stream) < order.num_tokens:
        for feed in stream.plan():
            if feed.target != NO_TARGET and feed.target < BARE.num_tokens:
                stream.record(feed.target, truth[feed.target])
    outputs = stream.tokens_of(stream.stream[: order.num_tokens])
    assert outputs != [truth[p] for p in order.positions]  # the stand-ins differ
    assert raster_tokens(outputs, order, BARE) == truth
    # A prefix shows drawn tokens only: a stand-in's position stays -1 until its real token.
    first_stand_in = next(k for k, p in enumerate(order.positions) if order.positions.count(p) == 2)
    prefix = raster_tokens(outputs[: first_stand_in + 1], order, BARE)
    assert prefix[order.positions[first_stand_in]] == -1
    assert [t for t in prefix if t != -1] == [truth[p] for p, t in enumerate(prefix) if t != -1]
