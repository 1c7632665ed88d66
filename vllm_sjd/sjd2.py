"""The SJD2 proposer: Jacobi-denoising windows (`{"method": "sjd2", ...}`).

A checkpoint fine-tuned by scripts/finetune_sjd2.py reads noisy token
embeddings with their noise level. Each request's window holds K slots
(core/jacobi_denoising.py): a clean prefix of drafts, each an exact sample of
the q kept beside it, that vLLM verifies with SJD's test; then noisy slots,
embeddings at rising levels, that the pass feeds after the drafts and never
verifies. The runner schedules the noisy slots as the row lookahead's tokens
(patches/row_lookahead_runner.py: unverified, their KV dropped, their rows
kept) and hands their embeddings to our model class
(vllm_sjd/models/chameleon.py `feed_noisy_embeddings`); the token id vLLM
sees at a noisy slot is a placeholder.

After a pass, every slot moves to its new place and takes one step from the
row that predicts it: a clean one is re-drafted from it (Jacobi), a noisy one
steps down along its denoising trajectory to at most its new place's level
(a noisy tail of T = `denoising_steps` slots rising to L at the back; clean
before it). A request's first window, and every slot that starts anew, is
pure noise. Only exact samples of their q are
ever verified, so the output keeps the fine-tuned model's distribution
(not the original checkpoint's: the fine-tuning changed the model).

Random numbers are counter-based per request key and absolute position
(core/rng.py), so a seeded image does not depend on the batch.
"""

from collections.abc import Sequence

import numpy as np
import torch

from vllm_sjd.config import SJD2Config, SJDConfigError
from vllm_sjd.core.columns import Columns, convert, same_columns
from vllm_sjd.core.denoising import NoiseSettings
from vllm_sjd.core.drafting import sample_inverse_cdf
from vllm_sjd.core.jacobi_denoising import (
    DenoisingWindow,
    initial_levels,
    next_denoising_window,
    window_levels,
)
from vllm_sjd.core.rng import DENOISING_TOKEN_STREAM, position_normals, window_uniforms
from vllm_sjd.core.window import StepRows
from vllm_sjd.proposer import SJDProposer

# The id vLLM schedules at a noisy slot; the model reads the slot's embedding instead.
PLACEHOLDER_TOKEN = 0


class SJD2Proposer(SJDProposer):
    """SJD's proposer with Jacobi-denoising windows; drafts and their q are kept as SJD
    keeps them (`draft_probs` unchanged), the noisy slots' levels and embeddings beside."""

    def __init__(self, vllm_config) -> None:
        super().__init__(vllm_config)
        self.noise = NoiseSettings.of_config(vllm_config.model_config.hf_config)
        if self.noise is None:
            raise SJDConfigError("speculative method 'sjd2' needs a checkpoint fine-tuned for it "
                                 "(config.json has no 'sjd2' entry; see scripts/finetune_sjd2.py)")
        self.sjd2 = SJD2Config.from_additional_config(vllm_config.additional_config)
        self._dynamic, self.policy = "off", None
        # The model's input embedding (set by the runner); [W, H] per column set.
        self.embed_tokens = None
        self._column_embeddings: tuple[Columns | None, torch.Tensor] | None = None
        # Per request: levels [K] and embeddings [K, H] of its window (drafts and q
        # are the parent's), the position of its slot 0, and what the next pass feeds.
        self._noisy: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._base: dict[str, int] = {}
        self._feeds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._noisy_rows: tuple[list[str], np.ndarray, torch.Tensor, Columns | None] | None = None
        self.planned_log: list[dict] | None = None  # tests: what each step meant to feed
        self._calls = 0

    @property
    def feeds_unverified(self) -> bool:
        return True

    def record_predictions(self, req_ids, cells, probs, row_strides, columns) -> None:
        """This step's rows of the noisy slots: probs[m] predicts absolute position cells[m]."""
        self._noisy_rows = (list(req_ids), np.asarray(cells, dtype=np.int64), probs, columns)

    def noisy_inputs(self, req_id: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` noisy slots a request feeds this step: (embeds [count, H], levels [count])."""
        embeds, levels = self._feeds[req_id]
        return embeds[:count], levels[:count]

    def propose_window(
        self,
        req_ids: Sequence[str],
        rows: StepRows,
        *,
        num_tokens: np.ndarray,
        seeds: Sequence[int | None],
        greedy: np.ndarray,
        has_output: Sequence[bool],
        mirror: Sequence[tuple[int, int]] = (),
        max_drafts: int | Sequence[int] | None = None,
        columns: Columns | None = None,
        **unused,
    ) -> list[list[int]]:
        """Every request's next window; returns its clean drafts, then a placeholder per noisy slot."""
        noisy_rows, self._noisy_rows = self._noisy_rows, None
        self._calls += 1
        if max_drafts is not None and not isinstance(max_drafts, int):
            max_drafts = list(max_drafts)
        device = rows.bonus_probs.device
        num_tokens = np.asarray(num_tokens, dtype=np.int64)
        view = None if columns is None else columns.to(device)
        rows = rows.for_batch(len(req_ids), mirror)  # a twin's rows, where the step left them out
        if not same_columns(rows.columns, view):
            rows = StepRows(convert(rows.target_probs, rows.columns, view),
                            convert(rows.bonus_probs, rows.columns, view), rows.num_draft_tokens,
                            rows.num_accepted, view, rows.host_counts)
        batch, num_slots = len(req_ids), self.num_slots
        keys = torch.from_numpy(self.request_keys(req_ids, seeds)).to(device)
        by_slot = self._rows_by_slot(req_ids, rows, noisy_rows, view)
        positions = torch.from_numpy(num_tokens[:, None] + np.arange(num_slots)).to(device)
        table = self._embeddings(view, by_slot.shape[-1], device)
        noise = position_normals(keys, positions, table.shape[-1])
        uniforms = window_uniforms(keys.cpu(), torch.from_numpy(num_tokens), num_slots,
                                   DENOISING_TOKEN_STREAM).to(device)
        ceilings = (window_levels(num_slots, self.noise, self.sjd2.denoising_steps, device) if self.sjd2.denoising
                    else torch.zeros(num_slots, dtype=torch.int64, device=device))
        previous, known = self._previous(req_ids, batch, table)
        stepped = next_denoising_window(previous, by_slot, rows.num_accepted.to(device), table,
                                        uniforms, noise, self.noise, ceilings)
        window = stepped
        if not known.all():  # a request's first window
            start = self._initial(by_slot, table, uniforms, noise)
            window = _where(torch.from_numpy(known).to(device), stepped, start)
        drafts = torch.where(window.drafts >= 0,
                             window.drafts if view is None else view.tokens(window.drafts.clamp(min=0)), -1)
        q = window.q
        for i, produced in enumerate(has_output):  # nothing committed: the window stays
            old = None if produced else self._window(req_ids[i], view)
            if old is not None and req_ids[i] in self._noisy:
                drafts[i], q[i] = old[0].to(device), old[1].to(device)
                window.levels[i], window.embeds[i] = (t.to(device) for t in self._noisy[req_ids[i]])
        if mirror:
            rows_to, rows_from = (torch.tensor(r, device=device) for r in zip(*mirror))
            drafts[rows_to], q[rows_to] = drafts[rows_from], q[rows_from]
            window.levels[rows_to], window.embeds[rows_to] = window.levels[rows_from], window.embeds[rows_from]
        self._store(req_ids, drafts, q, view)
        read = torch.cat([drafts, window.levels.to(drafts.dtype)], dim=1).tolist()  # the step's one read
        draft_lists = [row[:num_slots] for row in read]
        levels_host = np.array([row[num_slots:] for row in read], dtype=np.int64).reshape(batch, num_slots)
        limit = np.minimum(num_slots if max_drafts is None else max_drafts, num_slots)
        room = np.minimum(np.maximum(self.max_model_len - num_tokens, 0), limit)
        proposals = []
        for i, req_id in enumerate(req_ids):
            self._noisy[req_id] = (window.levels[i], window.embeds[i])
            self._base[req_id] = int(num_tokens[i])
            n = int(room[i])
            clean = min(int((levels_host[i] == 0).sum()), n)
            cells = num_tokens[i] + np.arange(clean, n, dtype=np.int64) + 1
            placeholders = [PLACEHOLDER_TOKEN] * (n - clean)
            self._lookahead_plan[req_id] = (clean, cells, placeholders)
            self._feeds[req_id] = (window.embeds[i, clean:n], window.levels[i, clean:n])
            if self.planned_log is not None and n > clean:
                self.planned_log.append({"call": self._calls, "positions": torch.from_numpy(cells - 1),
                                         "embeds": window.embeds[i, clean:n].float().cpu(),
                                         "levels": window.levels[i, clean:n].cpu()})
            proposals.append(draft_lists[i][:clean] + placeholders)
        return proposals

    def _rows_by_slot(self, req_ids, rows: StepRows, noisy_rows, view) -> torch.Tensor:
        """[B, K + 1, W]: row j predicts the old window's slot j: the verified rows, then
        the noisy slots' rows; a slot without one takes the nearest row before it."""
        n_host, _ = rows.counts_on_host()
        batch, num_slots = len(req_ids), self.num_slots
        tables = [rows.target_probs, rows.bonus_probs]
        noisy_start = rows.target_probs.shape[0] + batch
        source = np.full((batch, num_slots + 1), -1, dtype=np.int64)
        first = np.cumsum(n_host) - n_host
        for i, n in enumerate(n_host.tolist()):
            source[i, :n] = first[i] + np.arange(n)
            source[i, n] = rows.target_probs.shape[0] + i
        if noisy_rows is not None:
            ids, cells, probs, columns = noisy_rows
            tables.append(convert(probs, columns, view).to(rows.bonus_probs.device))
            index = {r: i for i, r in enumerate(req_ids)}
            for m, (req_id, cell) in enumerate(zip(ids, cells.tolist())):
                i = index.get(req_id)
                slot = None if i is None else cell - self._base.get(req_id, cell)
                if slot is not None and 0 < slot <= num_slots:
                    source[i, slot] = noisy_start + m
        for j in range(1, num_slots + 1):  # forward fill: every slot has a row
            source[:, j] = np.where(source[:, j] < 0, source[:, j - 1], source[:, j])
        all_rows = torch.cat(tables, dim=0)
        return all_rows[torch.from_numpy(source).to(all_rows.device)]

    def _embeddings(self, view: Columns | None, width: int, device) -> torch.Tensor:
        """[W, H] the model's input embedding of each column's token (all W ids without columns)."""
        if self.embed_tokens is None:
            raise RuntimeError("the SJD2 proposer needs the model's input embedding (set by the SJD runner)")
        cached = self._column_embeddings
        if (cached is None or not same_columns(cached[0], view) or cached[1].shape[0] != width
                or cached[1].device != torch.device(device)):
            ids = view.ids if view is not None else torch.arange(width, device=device)
            with torch.no_grad():
                table = self.embed_tokens(ids.to(device)).float()
            self._column_embeddings = cached = (view, table)
        return cached[1]

    def _previous(self, req_ids, batch: int, table: torch.Tensor) -> tuple[DenoisingWindow, np.ndarray]:
        """The stored windows' levels and embeddings ([B, K], [B, K, H]); which requests had one."""
        num_slots, device = self.num_slots, table.device
        levels = torch.zeros(batch, num_slots, dtype=torch.int64, device=device)
        embeds = table.new_zeros(batch, num_slots, table.shape[-1])
        known = np.array([r in self._noisy for r in req_ids], dtype=bool)
        for i in np.nonzero(known)[0]:
            levels[i], embeds[i] = (t.to(device) for t in self._noisy[req_ids[i]])
        unused = torch.full((batch, num_slots), -1, dtype=torch.int64, device=device)
        return DenoisingWindow(levels, unused, table.new_zeros(batch, num_slots, 1), embeds), known

    def _initial(self, by_slot, table, uniforms, noise) -> DenoisingWindow:
        """A request's first window: pure noise; denoising off, clean drafts from the
        newest row (the one that committed its first token)."""
        batch, num_slots = uniforms.shape
        if self.sjd2.denoising:
            levels = initial_levels(num_slots, self.noise, table.device).expand(batch, -1).clone()
            empty = torch.full((batch, num_slots), -1, dtype=torch.int64, device=table.device)
            return DenoisingWindow(levels, empty, by_slot.new_zeros((batch, num_slots, by_slot.shape[-1])),
                                   self.noise.embedding_rms * noise.float())
        newest = by_slot[:, :1].expand(-1, num_slots, -1)
        drafts = sample_inverse_cdf(newest, uniforms)
        zeros = torch.zeros(batch, num_slots, dtype=torch.int64, device=table.device)
        return DenoisingWindow(zeros, drafts, newest.clone(), table.new_zeros(batch, num_slots, table.shape[-1]))

    def evict(self, req_ids) -> None:
        req_ids = list(req_ids)
        super().evict(req_ids)
        for req_id in req_ids:
            self._noisy.pop(req_id, None)
            self._base.pop(req_id, None)
            self._feeds.pop(req_id, None)

    def tracked_requests(self) -> set[str]:
        return super().tracked_requests() | set(self._noisy) | set(self._base) | set(self._feeds)


def _where(condition: torch.Tensor, a: DenoisingWindow, b: DenoisingWindow) -> DenoisingWindow:
    """Per request ([B] bool): a's window where true, else b's."""
    def pick(x, y):
        return torch.where(condition.view(-1, *([1] * (x.dim() - 1))), x, y)

    return DenoisingWindow(pick(a.levels, b.levels), pick(a.drafts, b.drafts), pick(a.q, b.q),
                           pick(a.embeds, b.embeds.to(a.embeds.dtype)))
