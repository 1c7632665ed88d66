"""SJD2's noisy token embeddings, in plain torch: the schedule, the normalisation, the levels.

SJD2 (Speculative Jacobi-Denoising Decoding) fine-tunes a model to read
noise-perturbed token embeddings, with their noise level, and predict the
next clean token. What the paper leaves open is decided here (and recorded in
benchmarks/RESULTS.md, "SJD2"):

- Levels t = 0 .. L, t = 0 clean, t = L pure noise; cosine schedule
  alpha_bar(t) = cos^2(pi/2 * t/L).
- Normalisation before the noise: every embedding is scaled to one common
  RMS, sigma (the image codes' mean embedding RMS, stored with the
  checkpoint), so that no code stands out of the noise by its norm:
  x_t = sqrt(alpha_bar(t)) * e * sigma / rms(e) + sqrt(1 - alpha_bar(t)) * sigma * noise.
  Pure noise then has the clean embeddings' scale.
- The level reaches the model as a learned vector per level added to the
  input (a timestep embedding), zero for t = 0 and kept there: clean tokens
  go in exactly as before, so the checkpoint still serves AR and SJD.
- Training levels: after a random clean prefix of the image, consecutive
  segments of one random length take levels 1, 2, ... (capped at L), as a
  Jacobi window holds them at inference; the loss covers the clean prefix and
  the noisy run.

A fine-tuned checkpoint says so in its config: {"sjd2": {"noise_levels": L,
"embedding_rms": sigma}}, with the table as `model.sjd2_timestep_embedding.weight`.
"""

import math
from dataclasses import dataclass

import torch

CONFIG_KEY = "sjd2"
TIMESTEP_WEIGHT = "model.sjd2_timestep_embedding.weight"


@dataclass(frozen=True)
class NoiseSettings:
    noise_levels: int  # L
    embedding_rms: float  # sigma

    @classmethod
    def of_config(cls, hf_config) -> "NoiseSettings | None":
        """A checkpoint's settings (its config object or dict); None if it was not fine-tuned."""
        settings = (hf_config.get(CONFIG_KEY) if isinstance(hf_config, dict)
                    else getattr(hf_config, CONFIG_KEY, None))
        if not settings:
            return None
        return cls(int(settings["noise_levels"]), float(settings["embedding_rms"]))

    def as_config(self) -> dict:
        return {CONFIG_KEY: {"noise_levels": self.noise_levels, "embedding_rms": self.embedding_rms}}


def alpha_bar(levels: int, device=None) -> torch.Tensor:
    """[L + 1] float32: the clean signal's share of the variance at each level."""
    t = torch.arange(levels + 1, dtype=torch.float64, device=device) / levels
    return (torch.cos(t * math.pi / 2) ** 2).to(torch.float32)


def embedding_rms(embeddings: torch.Tensor) -> torch.Tensor:
    """[...] the RMS of each embedding vector [..., H]."""
    return embeddings.float().pow(2).mean(dim=-1).sqrt()


def scaled_embeddings(embeddings: torch.Tensor, settings: NoiseSettings) -> torch.Tensor:
    """Token embeddings [..., H] scaled to the common RMS sigma (float32)."""
    scale = settings.embedding_rms / embedding_rms(embeddings).clamp_min(1e-12)
    return embeddings.float() * scale.unsqueeze(-1)


def noisy_embeddings(
    clean: torch.Tensor,  # [..., H] the tokens' embeddings
    levels: torch.Tensor,  # [...] int64 in 0 .. L
    noise: torch.Tensor,  # [..., H] standard normal
    settings: NoiseSettings,
) -> torch.Tensor:
    """x_t for each token at its level; level-0 tokens come back unchanged."""
    a = alpha_bar(settings.noise_levels, clean.device)[levels].unsqueeze(-1)
    scaled = scaled_embeddings(clean, settings)
    x = a.sqrt() * scaled + (1 - a).sqrt() * settings.embedding_rms * noise.float()
    return torch.where((levels == 0).unsqueeze(-1), clean.float(), x).to(clean.dtype)


def training_levels(
    length: int,  # tokens in the span that may be noised
    generator: torch.Generator,
    settings: NoiseSettings,
    max_segment: int,
) -> tuple[torch.Tensor, int]:
    """([length] int64 levels, end): a clean prefix, then segments of one random
    length at levels 1, 2, ... (capped at L); `end` is where the noisy run stops
    (exclusive: the loss covers positions before it)."""
    start = int(torch.randint(length, (), generator=generator))
    segment = int(torch.randint(1, max_segment + 1, (), generator=generator))
    offset = torch.arange(length) - start
    levels = torch.where(offset < 0, 0, (offset // segment + 1).clamp(max=settings.noise_levels))
    end = min(length, start + segment * settings.noise_levels)
    return levels.masked_fill(torch.arange(length) >= end, 0), end
