"""SJD2's window update in plain torch: a clean prefix SJD verifies, a noisy tail being denoised.

Per request, K slots after the committed tokens. A clean slot holds a draft
token and the q it was drawn from (an exact sample, as in SJD); a noisy slot
holds an embedding x at level t >= 1 (core/denoising.py) that the model reads
in place of a token's embedding, with its level's timestep vector, and that
is never verified. Clean slots come first; levels rise along the window.

A pass computes row j for every slot j (the model's next-token distribution
there, given everything fed before it). With a drafts accepted, a + 1
tokens are committed and slot s of the next window is the old slot a + 1 + s.
Every slot takes one token y sampled from the row that predicts it, and
x0 = y's embedding scaled to the common RMS:
- its level drops by one, and further down to the ceiling of its new place
  (`window_levels`: clean, then a noisy tail of T slots rising to L), so
  a token denoises over T passes however many levels were trained (a level
  that only fell by one per pass would keep pace with the shift, and a
  window as long as L would never hold a clean draft);
- a clean slot takes y as its draft and the row as its q (the Jacobi update);
- a noisy slot steps along its own trajectory (DDIM, deterministic): the
  noise it carries eps = (x - sqrt(ab_t) x0) / sqrt(1 - ab_t), and
  x' = sqrt(ab_t') x0 + sqrt(1 - ab_t') eps at its new level t';
- a slot past the old window starts at its place's level from the caller's
  noise (eps = sigma * noise; pure noise at level L). With the ceilings all 0
  (denoising off) every slot is clean: SJD with Jacobi re-drafts, fresh
  slots drafted from the newest row (K).
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


def window_levels(num_slots: int, settings: NoiseSettings, steps: int, device=None) -> torch.Tensor:
    """[K] int64: the highest level each slot may hold after a pass. The last T = `steps`
    slots (at most K - 1) are the noisy tail, rising to L at the last slot, ceil(r L / T)
    at its r-th slot; the slots before it are clean. A token entering at the back then
    turns clean after T passes that commit one token each (DDIM's skipped levels)."""
    tail = max(min(steps, num_slots - 1), 0)
    r = torch.arange(num_slots, device=device) - (num_slots - tail) + 1  # 1..T in the tail
    levels = (r * settings.noise_levels + tail - 1) // max(tail, 1)
    return torch.where(r > 0, levels, 0).clamp(0, settings.noise_levels)


def initial_levels(num_slots: int, settings: NoiseSettings, device=None) -> torch.Tensor:
    """[K] levels of a request's first window: all pure noise (level L)."""
    return torch.full((num_slots,), settings.noise_levels, dtype=torch.int64, device=device)


def next_denoising_window(
    window: DenoisingWindow,
    rows: torch.Tensor,  # [B, K + 1, W] float32: row j of this pass predicts old slot j
    num_accepted: torch.Tensor,  # [B] int64: a
    column_embeddings: torch.Tensor,  # [W, H]: the embedding of each column's token
    uniforms: torch.Tensor,  # [B, K] float64: one per new slot, for its sampled token
    noise: torch.Tensor,  # [B, K, H] standard normal: for slots that start as noise
    settings: NoiseSettings,
    ceilings: torch.Tensor,  # [K] int64: each slot's highest level (window_levels; zeros: no noise)
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
    # Slots past the old window take the newest row, K.
    row_of = old_slot.clamp(max=num_slots)[:, :, None].expand(-1, -1, rows.shape[-1])
    row = rows.gather(1, row_of)  # [B, K, W]

    # One token per slot from its row: the Jacobi re-draft, or the denoiser's x0.
    token = sample_inverse_cdf(row, uniforms)
    x0 = scaled_embeddings(column_embeddings[token], settings)
    t = old_levels.clamp(min=1)
    carried = (old_x.float() - ab[t].sqrt()[..., None] * x0) / (1 - ab[t]).sqrt()[..., None]
    eps = torch.where(inside[..., None], carried, settings.embedding_rms * noise.float())
    levels = torch.minimum(torch.where(inside, old_levels - 1, settings.noise_levels),
                           ceilings.to(device)).clamp(min=0)
    stepped = ab[levels].sqrt()[..., None] * x0 + (1 - ab[levels]).sqrt()[..., None] * eps
    clean = levels == 0
    embeds = torch.where(clean[..., None], 0.0, stepped).to(window.embeds.dtype)
    drafts = torch.where(clean, token, -1)
    q = torch.where(clean[..., None], row, 0.0)
    return DenoisingWindow(levels, drafts, q, embeds)
