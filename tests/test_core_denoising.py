"""SJD2's noisy embeddings and training levels (vllm_sjd/core/denoising.py), without an engine."""

import torch

from vllm_sjd.core.denoising import NoiseSettings, alpha_bar, noisy_embeddings, training_levels

SETTINGS = NoiseSettings(noise_levels=8, embedding_rms=0.5)


def test_the_schedule_runs_from_clean_to_pure_noise():
    a = alpha_bar(8)
    assert a[0] == 1 and abs(float(a[-1])) < 1e-6
    assert (a[1:] < a[:-1]).all()


def test_clean_tokens_pass_unchanged_and_noise_hides_the_signal_as_the_level_rises():
    gen = torch.Generator().manual_seed(0)
    # Embeddings of very different norms: after normalisation the noise buries each alike.
    clean = torch.randn(4000, 64, generator=gen) * torch.linspace(0.1, 3.0, 4000)[:, None]
    noise = torch.randn(clean.shape, generator=gen)
    for level in range(SETTINGS.noise_levels + 1):
        x = noisy_embeddings(clean, torch.full((4000,), level), noise, SETTINGS)
        if level == 0:
            assert torch.equal(x, clean)
            continue
        # Every token comes out at the common scale sigma (signal and noise add in variance).
        rms = x.pow(2).mean(dim=-1).sqrt()
        assert abs(float(rms.mean()) - SETTINGS.embedding_rms) < 0.02
        signal = clean / clean.pow(2).mean(dim=-1, keepdim=True).sqrt()
        correlation = float((x * signal).mean() / SETTINGS.embedding_rms)
        assert abs(correlation - float(alpha_bar(8)[level].sqrt())) < 0.02
    mixed = noisy_embeddings(clean[:3], torch.tensor([0, 3, 8]), noise[:3], SETTINGS)
    assert torch.equal(mixed[0], clean[0]) and not torch.equal(mixed[1], clean[1])


def test_training_levels_are_a_clean_prefix_then_rising_segments():
    gen = torch.Generator().manual_seed(1)
    seen_segments = set()
    for _ in range(200):
        levels, end = training_levels(100, gen, SETTINGS, max_segment=4)
        noisy = torch.nonzero(levels).flatten()
        assert end <= 100
        if noisy.numel() == 0:
            continue
        start = int(noisy[0])
        assert (levels[:start] == 0).all() and (levels[start:end] > 0).all() and (levels[end:] == 0).all()
        run = levels[start:end]
        assert run[0] == 1 and (run[1:] >= run[:-1]).all() and run.max() <= SETTINGS.noise_levels
        assert ((run[1:] - run[:-1]) <= 1).all()
        seen_segments.add(int((run == 1).sum()))
    assert seen_segments == {1, 2, 3, 4}


def test_settings_round_trip_through_a_config_and_absent_means_not_fine_tuned():
    assert NoiseSettings.of_config(SETTINGS.as_config()) == SETTINGS
    assert NoiseSettings.of_config({"vocab_size": 3}) is None
