"""SJD2's window update (vllm_sjd/core/jacobi_denoising.py), without an engine."""

import numpy as np
import torch

from tests.stats import chi_square_pvalue
from vllm_sjd.core.denoising import NoiseSettings, alpha_bar, scaled_embeddings
from vllm_sjd.core.jacobi_denoising import DenoisingWindow, initial_levels, next_denoising_window
from vllm_sjd.core.rng import window_uniforms

SETTINGS = NoiseSettings(noise_levels=4, embedding_rms=0.5)
K, W, H = 6, 5, 16


def _window(levels, embeds=None):
    levels = torch.tensor(levels)
    batch = levels.shape[0]
    return DenoisingWindow(levels, torch.where(levels == 0, 0, -1), torch.zeros(batch, K, W),
                           torch.zeros(batch, K, H) if embeds is None else embeds)


def _uniforms(batch, start=0):
    return torch.from_numpy(window_uniforms(np.arange(batch) + 11, np.full(batch, start), K))


def test_an_all_noise_window_rises_from_level_one_to_pure_noise():
    assert initial_levels(8, NoiseSettings(4, 1.0)).tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    assert initial_levels(3, NoiseSettings(16, 1.0)).tolist() == [6, 11, 16]


def test_slots_shift_by_the_committed_tokens_and_each_noisy_slot_loses_one_level():
    gen = torch.Generator().manual_seed(0)
    window = _window([[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 4]])
    rows = torch.softmax(torch.randn(2, K + 1, W, generator=gen), dim=-1)
    new = next_denoising_window(window, rows, torch.tensor([0, 2]), torch.randn(W, H, generator=gen),
                                _uniforms(2), torch.randn(2, K, H, generator=gen), SETTINGS)
    # Request 0 committed 1 token: old slots 1..5, then one new slot at L.
    assert new.levels[0].tolist() == [0, 0, 1, 2, 3, 4]
    # Request 1 committed 3: old slots 3..5 (levels 3, 4, 4), then three new slots.
    assert new.levels[1].tolist() == [2, 3, 3, 4, 4, 4]
    clean = new.levels == 0
    assert ((new.drafts >= 0) == clean).all()
    # A clean slot's q is the row that predicts it (old slot a + 1 + s), a noisy one has none.
    assert torch.equal(new.q[0, 0], rows[0, 1]) and torch.equal(new.q[0, 1], rows[0, 2])
    assert (new.q[~clean] == 0).all() and (new.embeds[clean] == 0).all()
    # A slot that starts as noise is the caller's noise at the common scale.
    assert (new.embeds[~clean] != 0).all(dim=-1).all()


def test_a_noisy_slot_steps_along_its_own_trajectory_towards_the_sampled_token():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(W, H, generator=gen) * torch.arange(1, W + 1)[:, None]  # unequal norms
    ab = alpha_bar(SETTINGS.noise_levels)
    token, level = 3, 3
    x0 = scaled_embeddings(table[token], SETTINGS)
    eps = torch.randn(H, generator=gen) * SETTINGS.embedding_rms
    embeds = torch.zeros(1, K, H)
    embeds[0, 1] = ab[level].sqrt() * x0 + (1 - ab[level]).sqrt() * eps
    window = _window([[0, level, 4, 4, 4, 4]], embeds)
    rows = torch.zeros(1, K + 1, W)
    rows[..., token] = 1.0  # every row samples `token`
    new = next_denoising_window(window, rows, torch.tensor([0]), table, _uniforms(1),
                                torch.zeros(1, K, H), SETTINGS)
    expected = ab[level - 1].sqrt() * x0 + (1 - ab[level - 1]).sqrt() * eps
    assert new.levels[0, 0] == level - 1
    torch.testing.assert_close(new.embeds[0, 0], expected)
    # At level 1 a slot turns clean: its draft is the sampled token, its q the row.
    window = _window([[0, 1, 4, 4, 4, 4]], embeds)
    new = next_denoising_window(window, rows, torch.tensor([0]), table, _uniforms(1),
                                torch.zeros(1, K, H), SETTINGS)
    assert new.levels[0, 0] == 0 and new.drafts[0, 0] == token and torch.equal(new.q[0, 0], rows[0, 1])


def test_every_clean_draft_is_an_exact_sample_of_its_q():
    gen = torch.Generator().manual_seed(2)
    batch = 4000
    p = torch.softmax(torch.randn(W, generator=gen) * 1.5, dim=-1)
    rows = p.expand(batch, K + 1, W).contiguous()
    window = _window([[0, 0, 1, 1, 2, 3]] * batch)
    new = next_denoising_window(window, rows, torch.zeros(batch, dtype=torch.int64),
                                torch.randn(W, H, generator=gen), _uniforms(batch, 40),
                                torch.randn(batch, K, H, generator=gen), SETTINGS)
    assert (new.levels[:, :3] == 0).all()
    for slot in range(3):  # re-drafted (0), re-drafted (1), turned clean (2)
        samples = [(t,) for t in new.drafts[:, slot].tolist()]
        assert chi_square_pvalue(samples, {(t,): float(p[t]) for t in range(W)}) > 1e-4
