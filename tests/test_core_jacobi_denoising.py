"""SJD2's window update (vllm_sjd/core/jacobi_denoising.py), without an engine."""

import numpy as np
import torch

from tests.stats import chi_square_pvalue
from vllm_sjd.core.denoising import NoiseSettings, alpha_bar, scaled_embeddings
from vllm_sjd.core.jacobi_denoising import (
    DenoisingWindow,
    initial_levels,
    next_denoising_window,
    window_levels,
)
from vllm_sjd.core.rng import window_uniforms

SETTINGS = NoiseSettings(noise_levels=4, embedding_rms=0.5)
K, W, H = 6, 5, 16
CEILINGS = window_levels(K, SETTINGS, K - 1)  # a noisy tail of the whole window but slot 0


def _window(levels, embeds=None):
    levels = torch.tensor(levels)
    batch = levels.shape[0]
    return DenoisingWindow(levels, torch.where(levels == 0, 0, -1), torch.zeros(batch, K, W),
                           torch.zeros(batch, K, H) if embeds is None else embeds)


def _uniforms(batch, start=0):
    return torch.from_numpy(window_uniforms(np.arange(batch) + 11, np.full(batch, start), K))


def test_the_levels_rise_along_the_noisy_tail_and_a_first_window_is_pure_noise():
    assert window_levels(8, NoiseSettings(4, 1.0), 7).tolist() == [0, 1, 2, 2, 3, 3, 4, 4]
    assert window_levels(8, NoiseSettings(16, 1.0), 3).tolist() == [0, 0, 0, 0, 0, 6, 11, 16]
    assert window_levels(3, NoiseSettings(16, 1.0), 9).tolist() == [0, 8, 16]  # tail at most K - 1
    assert window_levels(1, NoiseSettings(16, 1.0), 4).tolist() == [0]
    assert initial_levels(3, NoiseSettings(16, 1.0)).tolist() == [16, 16, 16]


def test_a_short_tail_leaves_a_clean_prefix_that_grows_back_after_each_pass():
    gen = torch.Generator().manual_seed(5)
    ceilings = window_levels(K, SETTINGS, 2)  # [0, 0, 0, 0, 2, 4]
    window = DenoisingWindow(initial_levels(K, SETTINGS)[None], torch.full((1, K), -1),
                             torch.zeros(1, K, W), torch.randn(1, K, H, generator=gen))
    for step, accepted in enumerate([0, 3, 1]):
        rows = torch.softmax(torch.randn(1, K + 1, W, generator=gen), dim=-1)
        window = next_denoising_window(window, rows, torch.tensor([accepted]), torch.randn(W, H, generator=gen),
                                       _uniforms(1, step), torch.randn(1, K, H, generator=gen), SETTINGS,
                                       ceilings)
        assert window.levels[0, :4].tolist() == [0, 0, 0, 0] and (window.drafts[0, :4] >= 0).all()
        assert window.levels[0, 4] in (1, 2) and window.levels[0, 5] in (3, 4)


def test_a_window_as_long_as_the_levels_holds_clean_drafts_at_one_token_a_pass():
    # Falling one level a pass while shifting one slot, its front would stay noisy.
    settings = NoiseSettings(noise_levels=K, embedding_rms=0.5)
    ceilings = window_levels(K, settings, K - 1)
    gen = torch.Generator().manual_seed(3)
    window = DenoisingWindow(initial_levels(K, settings)[None], torch.full((1, K), -1),
                             torch.zeros(1, K, W), torch.randn(1, K, H, generator=gen))
    for step in range(3):
        rows = torch.softmax(torch.randn(1, K + 1, W, generator=gen), dim=-1)
        window = next_denoising_window(window, rows, torch.tensor([0]), torch.randn(W, H, generator=gen),
                                       _uniforms(1, step), torch.randn(1, K, H, generator=gen), settings,
                                       ceilings)
        assert window.levels[0, 0] == 0 and window.drafts[0, 0] >= 0
        assert (window.levels[0] <= ceilings).all()
        assert (window.levels[0, 1:] > 0).all()  # the rest still denoising


def test_with_every_ceiling_zero_nothing_is_noisy():
    gen = torch.Generator().manual_seed(4)
    window = _window([[0, 0, 1, 2, 3, 4]])
    rows = torch.softmax(torch.randn(1, K + 1, W, generator=gen), dim=-1)
    new = next_denoising_window(window, rows, torch.tensor([1]), torch.randn(W, H, generator=gen),
                                _uniforms(1), torch.randn(1, K, H, generator=gen), SETTINGS,
                                ceilings=torch.zeros(K, dtype=torch.int64))
    assert (new.levels == 0).all() and (new.drafts >= 0).all() and (new.embeds == 0).all()
    # Slots past the old window are drafted from the newest row, K.
    assert torch.equal(new.q[0, -1], rows[0, K]) and torch.equal(new.q[0, -2], rows[0, K])


def test_slots_shift_by_the_committed_tokens_and_each_noisy_slot_loses_one_level():
    gen = torch.Generator().manual_seed(0)
    window = _window([[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 4]])
    rows = torch.softmax(torch.randn(2, K + 1, W, generator=gen), dim=-1)
    noise = torch.randn(2, K, H, generator=gen)
    new = next_denoising_window(window, rows, torch.tensor([0, 2]), torch.randn(W, H, generator=gen),
                                _uniforms(2), noise, SETTINGS, CEILINGS)
    # Request 0 committed 1 token: old slots 1..5, then one new slot at L.
    assert new.levels[0].tolist() == [0, 0, 1, 2, 3, 4]
    # Request 1 committed 3: old slots 3..5 (levels 3, 4, 4), each down to its new
    # place's ceiling (0, 1, 2), then three new slots at theirs.
    assert CEILINGS.tolist() == [0, 1, 2, 3, 4, 4]
    assert new.levels[1].tolist() == [0, 1, 2, 3, 4, 4]
    clean = new.levels == 0
    assert ((new.drafts >= 0) == clean).all()
    # A clean slot's q is the row that predicts it (old slot a + 1 + s), a noisy one has none.
    assert torch.equal(new.q[0, 0], rows[0, 1]) and torch.equal(new.q[0, 1], rows[0, 2])
    assert (new.q[~clean] == 0).all() and (new.embeds[clean] == 0).all()
    # A slot that starts at level L is the caller's noise at the common scale.
    fresh = torch.tensor([[False] * 5 + [True], [False] * 4 + [True] * 2])
    torch.testing.assert_close(new.embeds[fresh], SETTINGS.embedding_rms * noise[fresh])
    assert (new.embeds[~clean] != 0).all(dim=-1).all()


def test_a_noisy_slot_steps_along_its_own_trajectory_towards_the_sampled_token():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(W, H, generator=gen) * torch.arange(1, W + 1)[:, None]  # unequal norms
    ab = alpha_bar(SETTINGS.noise_levels)
    token, level = 3, 3
    x0 = scaled_embeddings(table[token], SETTINGS)
    eps = torch.randn(H, generator=gen) * SETTINGS.embedding_rms
    embeds = torch.zeros(1, K, H)
    embeds[0, 3] = ab[level].sqrt() * x0 + (1 - ab[level]).sqrt() * eps
    window = _window([[0, 0, 0, level, 4, 4]], embeds)
    rows = torch.zeros(1, K + 1, W)
    rows[..., token] = 1.0  # every row samples `token`
    new = next_denoising_window(window, rows, torch.tensor([0]), table, _uniforms(1),
                                torch.zeros(1, K, H), SETTINGS, CEILINGS)
    expected = ab[level - 1].sqrt() * x0 + (1 - ab[level - 1]).sqrt() * eps
    assert new.levels[0, 2] == level - 1  # old slot 3, within its new place's ceiling (2)
    torch.testing.assert_close(new.embeds[0, 2], expected)
    # Moved further (a = 1), it drops to its new place's ceiling, 1, on the same trajectory.
    new = next_denoising_window(window, rows, torch.tensor([1]), table, _uniforms(1),
                                torch.zeros(1, K, H), SETTINGS, CEILINGS)
    assert new.levels[0, 1] == 1
    torch.testing.assert_close(new.embeds[0, 1], ab[1].sqrt() * x0 + (1 - ab[1]).sqrt() * eps)
    # At level 1 a slot turns clean: its draft is the sampled token, its q the row.
    window = _window([[0, 1, 4, 4, 4, 4]], embeds)
    new = next_denoising_window(window, rows, torch.tensor([0]), table, _uniforms(1),
                                torch.zeros(1, K, H), SETTINGS, CEILINGS)
    assert new.levels[0, 0] == 0 and new.drafts[0, 0] == token and torch.equal(new.q[0, 0], rows[0, 1])


def test_every_clean_draft_is_an_exact_sample_of_its_q():
    gen = torch.Generator().manual_seed(2)
    batch = 4000
    p = torch.softmax(torch.randn(W, generator=gen) * 1.5, dim=-1)
    rows = p.expand(batch, K + 1, W).contiguous()
    window = _window([[0, 0, 1, 1, 2, 3]] * batch)
    new = next_denoising_window(window, rows, torch.zeros(batch, dtype=torch.int64),
                                torch.randn(W, H, generator=gen), _uniforms(batch, 40),
                                torch.randn(batch, K, H, generator=gen), SETTINGS, CEILINGS)
    assert (new.levels[:, :3] == 0).all()
    for slot in range(3):  # re-drafted (0), re-drafted (1), turned clean (2)
        samples = [(t,) for t in new.drafts[:, slot].tolist()]
        assert chi_square_pvalue(samples, {(t,): float(p[t]) for t in range(W)}) > 1e-4
