"""SJD's row lookahead inside vLLM's V1 runner (core/row_lookahead.py says what it is).

Part of the SJD model runner (patches/sjd_runner.py). Overrides
vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs (extended):
after vLLM has computed positions, the KV slot mapping and the speculative
metadata for every scheduled draft, a request's lookahead tokens (the drafts
after its window's, as the proposer planned them) get their raster positions
in `self.positions` (or `self.mrope_positions`), and the metadata vLLM
returns covers the window's drafts only: the rejection sampler or SJD's own
step verifies those, the scheduler counts the lookahead as rejected and
frees its KV. The lookahead's logits rows go last in `logits_indices`;
`_sample` splits them off and turns them into the predictions the proposer
keeps. SJD2's noisy slots (vllm_sjd/sjd2.py) ride the same way, at their
own positions, and their embeddings go to the model beside the token ids
(`feed_noisy_embeddings`). Checked on vLLM 0.32.0 and 0.33.0.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from vllm_sjd.guidance import blend
from vllm_sjd.proposer import SJDProposer


@dataclass
class LookaheadRows:
    """This step's lookahead rows, after the window's rows in the logits."""

    num_window_rows: int  # logits rows of the windows (they come first)
    request_of_row: np.ndarray  # [M] int64 batch index of each lookahead row
    cells: np.ndarray  # [M] int64 absolute position each row predicts


class RowLookaheadRunnerMixin:
    """The row lookahead's overrides of the SJD runner (active with row_lookahead > 0)."""

    def _lookahead_proposer(self) -> SJDProposer | None:
        proposer = getattr(self, "_proposer", None)
        if isinstance(proposer, SJDProposer) and proposer.feeds_unverified:
            return proposer
        return None

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        self._lookahead_rows = None
        proposer = self._lookahead_proposer()
        if proposer is None or result[1] is None:
            return result
        return self._split_lookahead(proposer, np.asarray(num_scheduled_tokens, dtype=np.int64),
                                     *result)

    def _split_lookahead(self, proposer, num_scheduled, logits_indices, metadata, max_sampled):
        num_reqs = self.input_batch.num_reqs
        n = np.asarray(metadata.num_draft_tokens, dtype=np.int64)
        window = n.copy()
        cells = [np.zeros(0, dtype=np.int64)] * num_reqs
        for i, req_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            plan = proposer.lookahead_plan(req_id)
            # vLLM may cut the drafts short (token budget): the lookahead goes first.
            if plan is not None and n[i] > plan[0]:
                window[i] = plan[0]
                cells[i] = plan[1][: n[i] - plan[0]]
        extra = n - window
        if not extra.any():
            return logits_indices, metadata, max_sampled
        device = logits_indices.device

        # Raster positions for the lookahead tokens: fed at cell - 1. The drafts
        # are the last n tokens a request feeds this step.
        computed = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        first_token = np.cumsum(num_scheduled[:num_reqs]) - num_scheduled[:num_reqs]
        offsets = np.zeros(int(num_scheduled[:num_reqs].sum()), dtype=np.int64)
        for i in np.nonzero(extra)[0]:
            index = num_scheduled[i] - n[i] + window[i] + np.arange(extra[i])
            offsets[first_token[i] + index] = cells[i] - 1 - (computed[i] + index)
        self._shift_positions(offsets)
        if hasattr(proposer, "noisy_inputs"):
            self._feed_noisy_slots(proposer, first_token + num_scheduled[:num_reqs] - n + window, extra)

        # Windows' rows first (n' + 1 a request), then the lookahead's.
        first_row = np.cumsum(n + 1) - (n + 1)
        window_rows = np.concatenate([first_row[i] + np.arange(window[i] + 1) for i in range(num_reqs)])
        extra_rows = np.concatenate([first_row[i] + window[i] + 1 + np.arange(extra[i])
                                     for i in range(num_reqs)])
        first_draft = np.cumsum(n) - n
        drafts = np.concatenate([first_draft[i] + np.arange(window[i]) for i in range(num_reqs)])
        new_first = np.cumsum(window + 1) - (window + 1)
        targets = np.concatenate([new_first[i] + np.arange(window[i]) for i in range(num_reqs)])

        def on_device(values, dtype=torch.int32):
            return torch.from_numpy(np.asarray(values)).to(device=device, dtype=dtype)

        window_indices = logits_indices[on_device(window_rows, torch.int64)]
        window_metadata = dataclasses.replace(
            metadata,
            draft_token_ids=metadata.draft_token_ids[on_device(drafts, torch.int64)],
            num_draft_tokens=window.tolist(),
            cu_num_draft_tokens=on_device(np.cumsum(window)),
            cu_num_sampled_tokens=on_device(np.cumsum(window + 1)),
            target_logits_indices=on_device(targets),
            bonus_logits_indices=on_device(new_first + window),
            logits_indices=window_indices,
        )
        self._lookahead_rows = LookaheadRows(
            num_window_rows=len(window_rows),
            request_of_row=np.repeat(np.arange(num_reqs), extra),
            cells=np.concatenate(cells),
        )
        all_indices = torch.cat([window_indices, logits_indices[on_device(extra_rows, torch.int64)]])
        return all_indices, window_metadata, int((window + 1).max())

    def _feed_noisy_slots(self, proposer, first_index: np.ndarray, counts: np.ndarray) -> None:
        """SJD2: the model reads each request's noisy slots (its `counts[i]` unverified
        tokens, from flat index first_index[i]) as the proposer's embeddings."""
        feeds = [(i, *proposer.noisy_inputs(self.input_batch.req_ids[i], int(c)))
                 for i, c in enumerate(counts.tolist()) if c]
        if not feeds:
            return
        index = np.concatenate([first_index[i] + np.arange(len(levels)) for i, _, levels in feeds])
        device = self.positions.device
        self.get_model().feed_noisy_embeddings(
            torch.from_numpy(index).to(device),
            torch.cat([embeds.to(device) for _, embeds, _ in feeds]),
            torch.cat([levels.to(device) for _, _, levels in feeds]),
        )

    def _shift_positions(self, offsets: np.ndarray) -> None:
        """Add `offsets` to the positions of this step's tokens (the slot mapping stays)."""
        if not offsets.any():
            return
        shift = torch.from_numpy(offsets).to(self.positions.device)
        if self.uses_mrope:
            self.mrope_positions.gpu[:, : shift.numel()] += shift
        else:
            self.positions[: shift.numel()] += shift

    def _lookahead_predictions(self, logits, lookahead: LookaheadRows, pairs, greedy):
        """The lookahead rows processed as the verifier would process a row at their cells:
        guidance, the layout's mask at the cell, temperature, top-k (probabilities, on
        the layout's columns where every request has one)."""
        num_reqs = self.input_batch.num_reqs
        entries = self._layout_entries(self.input_batch.req_ids[:num_reqs])
        vocab_size, device = logits.shape[-1], logits.device
        columns = self._layouts.columns(entries, vocab_size, device)
        scores = (logits if columns is None else columns.select(logits)).float()
        rows_of = lookahead.request_of_row
        for c, t, scale in zip(pairs.cond, pairs.twin, pairs.scale):
            cond_rows, twin_rows = np.nonzero(rows_of == c)[0], np.nonzero(rows_of == t)[0]
            if len(cond_rows) and len(cond_rows) == len(twin_rows):
                cond_rows = torch.from_numpy(cond_rows).to(device)
                twin_rows = torch.from_numpy(twin_rows).to(device)
                guided = blend(scores[cond_rows], scores[twin_rows], scale)
                scores[cond_rows] = guided
                scores[twin_rows] = guided
        prompt_lens = np.array([prompt_len for _, prompt_len in entries], dtype=np.int64)
        mask = self._layouts.masks_at(entries, rows_of, lookahead.cells - prompt_lens[rows_of],
                                      vocab_size, device, columns)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        sampling_metadata = self.input_batch.sampling_metadata
        top_k = None if sampling_metadata.top_k is None else self.input_batch.top_k_cpu[:num_reqs]
        counts = np.bincount(rows_of, minlength=num_reqs).astype(np.int64)
        probs = self._processed_probs(scores, counts, sampling_metadata,
                                      torch.from_numpy(greedy).to(device), top_k)
        strides = [0 if entries[i][0] is None else entries[i][0].row_stride for i in rows_of]
        req_ids = [self.input_batch.req_ids[i] for i in rows_of]
        return req_ids, lookahead.cells, probs, strides, columns

    def _record_predictions(self, predicted, sampled_token_ids) -> None:
        """Hand the proposer the predictions of requests that committed tokens this
        step (a held pair member's rows were not guided with its partner's)."""
        req_ids, cells, probs, strides, columns = predicted
        produced = {r for r, t in zip(self.input_batch.req_ids, sampled_token_ids) if t}
        keep = [m for m, r in enumerate(req_ids) if r in produced]
        if len(keep) < len(req_ids):
            index = torch.tensor(keep, dtype=torch.int64, device=probs.device)
            req_ids, cells = [req_ids[m] for m in keep], cells[keep]
            probs, strides = probs[index], [strides[m] for m in keep]
        if req_ids:
            self.drafter.record_predictions(req_ids, cells, probs, strides, columns)

