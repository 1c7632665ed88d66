"""SJD2's window update in plain torch: a clean prefix SJD verifies, a noisy tail being denoised.

Per request, K slots after the committed tokens. A clean slot holds a draft
token and the q it was drawn from (an exact sample, as in SJD); a noisy slot
holds an embedding x at level t >= 1 (core/denoising.py) that the model reads
in place of a token's embedding, with its level's timestep vector, and that
is never verified. Clean slots come first; levels rise along the window.

A pass computes row j for every slot j (the model's next-token distribution
there, given everything fed before it). With a drafts accepted, a + 1
tokens are committed and slot s of the next window is the old slot a + 1 + s:
- a clean slot is re-drafted from its new row (the Jacobi update; q = row);
- a noisy slot at level t takes one step along its trajectory (DDIM): a token
  y is sampled from its row, x0 = y's embedding scaled to the common RMS,
  the noise it carries eps = (x - sqrt(ab_t) x0) / sqrt(1 - ab_t), and
  x' = sqrt(ab_{t-1}) x0 + sqrt(1 - ab_{t-1}) eps; at t = 1 the slot turns
  clean with draft y and q = its row;
- slots past the old window start at level L from the caller's noise.
Every verified draft is an exact sample of its q, so the verification keeps
the fine-tuned model's own distribution, whatever the noise does (lossless
with respect to the fine-tuned model, not the original).
"""

from dataclasses import dataclass

import torch

from vllm_sjd.core.denoising import NoiseSettings, alpha_bar, scaled_embeddings
from vllm_sjd.core.drafting import sample_inverse_cdf


@dataclass
class DenoisingWindow:
    """Every request's SJD2 window, [B, K, ...]."""

    levels: torch.Tensor  # [B, K] int64: 0 clean, 1..L noisy
    drafts: torch.Tensor  # [B, K] int64 column index where clean, -1 where noisy
    q: torch.Tensor  # [B, K, W] float32: each clean draft's q (zeros where noisy)
    embeds: torch.Tensor  # [B, K, H]: each noisy slot's x (zeros where clean)


def initial_levels(num_slots: int, settings: NoiseSettings, device=None) -> torch.Tensor:
    """[K] levels of a window that is all noise: rising from 1 to L along the slots."""
    slots = torch.arange(1, num_slots + 1, device=device)
    return torch.clamp((slots * settings.noise_levels + num_slots - 1) // num_slots, 1,
                       settings.noise_levels)


def next_denoising_window(
    window: DenoisingWindow,
    rows: torch.Tensor,  # [B, K + 1, W] float32: row j of this pass predicts old slot j
    num_accepted: torch.Tensor,  # [B] int64: a
    column_embeddings: torch.Tensor,  # [W, H]: the embedding of each column's token
    uniforms: torch.Tensor,  # [B, K] float64: one per new slot, for its sampled token
    noise: torch.Tensor,  # [B, K, H] standard normal: for slots that start as noise
    settings: NoiseSettings,
) -> DenoisingWindow:
    """The window after a pass that committed a + 1 tokens per request."""
    num_slots = window.levels.shape[1]
    device = window.levels.device
    ab = alpha_bar(settings.noise_levels, device)
    old_slot = num_accepted[:, None] + 1 + torch.arange(num_slots, device=device)  # [B, K]
    inside = old_slot < num_slots
    gather = old_slot.clamp(max=num_slots - 1)
    old_levels = window.levels.gather(1, gather)
    old_x = window.embeds.gather(1, gather[:, :, None].expand(-1, -1, window.embeds.shape[-1]))
    row = rows.gather(1, gather[:, :, None].expand(-1, -1, rows.shape[-1]))  # [B, K, W]

    # One token per slot from its row: the Jacobi re-draft, or the denoiser's x0.
    token = sample_inverse_cdf(row, uniforms)
    x0 = scaled_embeddings(column_embeddings[token], settings)
    t = old_levels.clamp(min=1)
    eps = (old_x.float() - ab[t].sqrt()[..., None] * x0) / (1 - ab[t]).sqrt()[..., None]
    stepped = ab[t - 1].sqrt()[..., None] * x0 + (1 - ab[t - 1]).sqrt()[..., None] * eps
    levels = torch.where(inside, (old_levels - 1).clamp(min=0), settings.noise_levels)
    clean = levels == 0
    fresh_noise = settings.embedding_rms * noise.float()
    embeds = torch.where(inside[..., None], stepped, fresh_noise)
    embeds = torch.where(clean[..., None], 0.0, embeds).to(window.embeds.dtype)
    drafts = torch.where(clean, token, -1)
    q = torch.where(clean[..., None], row, 0.0)
    return DenoisingWindow(levels, drafts, q, embeds)
