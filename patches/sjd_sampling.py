"""SJD's own sampling step: every row of a step on the layout's columns, verified by core/verify.py.

Part of the SJD model runner (patches/sjd_runner.py), replacing what
vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample does under speculation
(vLLM's Sampler, or its RejectionSampler when drafts are verified). Checked on
vLLM 0.32.0 and 0.33.0.

Why: vLLM's samplers work on the whole vocabulary: temperature, top-k and two
softmaxes over [rows, V], q handed in as [drafts, V], the recovered token from
V exponentials per request; then SJD needs the same rows again. An image
request's rows carry mass only on its layout's ids (513 of 8960 on the demo
model, 8195 of 65536 on Lumina-mGPT), so this step gathers those columns once,
applies guidance, the layout, temperature, top-k and top-p there (vLLM's own
top-k/top-p function), verifies with core/verify.py, and hands the same
probabilities to the proposer. Batches that mix in a request without a layout
run the same code on the whole vocabulary.

What stays vLLM's: logits processors, penalties, bad words and allowed token
ids (applied by vLLM's own functions on the full rows, only when a request
uses one), and whole steps that want logprobs (vLLM's samplers then run as
before). Random numbers are SJD's counter-based ones, so a seeded request's
tokens do not depend on its batch; the seeded generators vLLM keeps are not
used, and hidden from vLLM's rewind of discarded rows.
"""

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

from vllm_sjd.core.columns import Columns
from vllm_sjd.core.verify import verify
from vllm_sjd.core.window import StepRows
from vllm_sjd.guidance import leading_rows, row_among_leading


def samples_without_logprobs(sampling_metadata) -> bool:
    """No request of the step asks for logprobs (SJD's step returns none)."""
    return sampling_metadata.max_num_logprobs is None and not sampling_metadata.logprob_token_ids


def _uses_logits_processing(sampling_metadata) -> bool:
    """Whether a request uses penalties, bad words, allowed ids or a logits processor."""
    if not sampling_metadata.no_penalties or sampling_metadata.bad_words_token_ids:
        return True
    if sampling_metadata.allowed_token_ids_mask is not None:
        return True
    holder = sampling_metadata.thinking_budget_state_holder
    if holder is not None and holder.has_tracked_requests():
        return True
    # MinTokensLogitsProcessor keeps `min_toks` while a request is short of
    # its min_tokens; any other processor is assumed to have work.
    return any(
        getattr(processor, "min_toks", True)
        for processor in sampling_metadata.logitsprocs.non_argmax_invariant
    )


def request_rows(counts: np.ndarray, requests: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
    """The rows of these requests, in order, where request i has counts[i] rows from
    starts[i] (default: right after request i - 1's)."""
    counts = np.asarray(counts, dtype=np.int64)
    if starts is None:
        starts = np.cumsum(counts) - counts
    lengths = counts[requests]
    first = starts[requests] - (np.cumsum(lengths) - lengths)
    return np.repeat(first, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def take_requests(values: torch.Tensor, counts: np.ndarray, requests: np.ndarray) -> torch.Tensor:
    """The rows of these requests (ascending batch rows), request i having counts[i] rows
    in batch order: a view where the requests are a run (one guided pair's conditional
    request, say), else one index_select."""
    first, last = int(requests[0]), int(requests[-1])
    if last - first == len(requests) - 1:
        return values.narrow(0, int(counts[:first].sum()), int(counts[first:last + 1].sum()))
    return values.index_select(0, torch.from_numpy(request_rows(counts, requests)).to(values.device))


class SJDSamplingMixin:
    """The SJD runner's `_sample` under speculation, on the layout's columns."""

    def _sample_on_columns(self, logits, spec_decode_metadata, counts: np.ndarray, pairs, greedy):
        """(SamplerOutput, StepRows without accepted counts) of one step.

        A guided twin's rows equal its conditional request's once guided, and it
        commits that request's tokens: only the other requests' rows are processed
        and verified (`StepRows.requests`)."""
        self.input_batch.update_async_output_token_ids()
        sampling_metadata = self.input_batch.sampling_metadata
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        entries = self._layout_entries(req_ids)
        vocab_size, device = logits.shape[-1], logits.device
        columns = self._layouts.columns(entries, vocab_size, device)
        first = self.input_batch.num_tokens_no_spec[:num_reqs].astype(np.int64)

        # float32 before guidance: bf16 logits (a GPU model's) would lose the
        # difference cond - uncond (a no-op for float32 models).
        if columns is None or _uses_logits_processing(sampling_metadata):
            # Guidance and the layout on the full rows, then vLLM's processors.
            logits = logits.float()
            if pairs.cond:
                self._guide(logits, pairs, counts)
            self._apply_layout(logits, counts)
            logits = self._vllm_logits_processing(logits, spec_decode_metadata)
            scores = logits if columns is None else columns.select(logits)
        else:
            scores = columns.select(logits).float()
            if pairs.cond:
                self._guide(scores, pairs, counts)
            # The layout as 0 / -inf added: the same scores as a masked fill, at the cost of an add.
            self._layouts.add_row_masks(scores, entries, first, counts, vocab_size, columns)
        if spec_decode_metadata is None:
            num_draft = np.zeros(num_reqs, dtype=np.int64)
            draft_ids = torch.zeros(0, dtype=torch.int64, device=device)
        else:
            num_draft = np.asarray(spec_decode_metadata.num_draft_tokens, dtype=np.int64)
            draft_ids = spec_decode_metadata.draft_token_ids
        mirror = list(zip(pairs.twin, pairs.cond))
        lead = leading_rows(num_reqs, mirror)
        verified = slice(None) if lead is None else lead
        if lead is not None:  # the twins' rows left out
            scores = take_requests(scores, counts, lead)
            draft_ids = take_requests(draft_ids, num_draft, lead)
            counts, num_draft, first, greedy = counts[lead], num_draft[lead], first[lead], greedy[lead]
            req_ids = [req_ids[i] for i in lead.tolist()]
        top_k = None if sampling_metadata.top_k is None else self.input_batch.top_k_cpu[:num_reqs][verified]
        greedy_rows = torch.from_numpy(greedy).to(device)
        # Greedy requests keep their argmax at temperature 1 (vLLM keeps 0.0 for them).
        temperature = np.where(greedy, 1.0, self.input_batch.temperature_cpu[:num_reqs][verified])
        probs = self._processed_probs(scores, counts, sampling_metadata, greedy_rows, top_k,
                                      temperature.astype(np.float32), lead)

        if len(counts) == 1:  # rows 0..n-1, then row n
            target_probs, bonus_probs = probs[: num_draft[0]], probs[num_draft[0]:]
        else:
            if spec_decode_metadata is not None and lead is None:
                target_rows = spec_decode_metadata.target_logits_indices
                bonus_rows = spec_decode_metadata.bonus_logits_indices
            else:  # row n of each request, and rows 0..n-1 before it
                bonus = np.cumsum(counts) - 1
                bonus_rows = torch.from_numpy(bonus).to(device)
                target_rows = torch.from_numpy(request_rows(num_draft, np.arange(len(counts)),
                                                            bonus - num_draft)).to(device)
            target_probs = probs.index_select(0, target_rows)
            bonus_probs = probs.index_select(0, bonus_rows)
        num_draft = num_draft.tolist()
        drafts, q = self._draft_distributions(req_ids, num_draft, draft_ids, columns, probs,
                                              None if lead is None else lead.tolist())
        seeds = [self.requests[r].sampling_params.seed for r in req_ids]
        verdict = verify(
            target_probs,
            bonus_probs,
            np.asarray(num_draft, dtype=np.int64),
            max(num_draft, default=0),
            drafts,
            q,
            greedy_rows,
            self.drafter.request_keys(req_ids, seeds),
            first,
            any_greedy=bool(greedy.any()),
        )
        tokens = verdict.tokens
        if lead is not None and len(lead) == 1:  # one request and its twin: the same tokens
            tokens = tokens.expand(num_reqs, -1)
        elif lead is not None:  # a twin commits exactly its conditional request's tokens
            tokens = tokens.index_select(0, torch.tensor(row_among_leading(num_reqs, lead, mirror), device=device))
        if columns is not None:
            tokens = columns.tokens(tokens)  # the verifier's placeholder, -1, stays -1
        self._generators_untouched = True
        rows = StepRows(target_probs, bonus_probs, None, None, columns, requests=lead)
        return SamplerOutput(sampled_token_ids=tokens.to(torch.int32), logprobs_tensors=None), rows

    def _vllm_logits_processing(self, logits, spec_decode_metadata):
        """vLLM's penalties, bad words, allowed ids and logits processors, as its samplers apply them."""
        sampling_metadata = self.input_batch.sampling_metadata
        if not _uses_logits_processing(sampling_metadata):
            return logits
        if spec_decode_metadata is None:
            return self.sampler.apply_logits_processors(logits, sampling_metadata, False)
        target = spec_decode_metadata.target_logits_indices
        bonus = spec_decode_metadata.bonus_logits_indices
        logits[target] = self.rejection_sampler.apply_logits_processors(
            logits[target], sampling_metadata, spec_decode_metadata
        )
        logits[bonus] = self.sampler.apply_logits_processors(
            logits[bonus], sampling_metadata, True
        )
        return logits

    @staticmethod
    def _processed_probs(
        scores,
        counts: np.ndarray,  # [B] rows per request
        sampling_metadata,
        greedy: torch.Tensor,  # [B] bool, on the scores' device
        top_k_host: np.ndarray | None,  # [B] each request's top-k as the host keeps it
        temperature_host: np.ndarray | None = None,  # [B] float32, the host's, greedy ones at 1
        requests: np.ndarray | None = None,  # [B] batch rows of the requests; None: the first B
    ) -> torch.Tensor:
        """Temperature, top-k and top-p per row, then the softmax, [rows, W] float32."""
        num_reqs, width = counts.shape[0], scores.shape[-1]
        device, num_rows = scores.device, scores.shape[0]

        def per_request(values: torch.Tensor) -> torch.Tensor:  # sampling_metadata's [batch] tensors
            if requests is None:
                return values[:num_reqs]
            return values.index_select(0, torch.from_numpy(requests).to(values.device))

        per_row = torch.from_numpy(counts).to(device)
        if sampling_metadata.temperature is not None and temperature_host is not None:
            # Per row on the host: one copy instead of a repeat on the device.
            scores.div_(torch.from_numpy(np.repeat(temperature_host, counts)).to(device)[:, None])
        elif sampling_metadata.temperature is not None:
            temperature = per_request(sampling_metadata.temperature).to(torch.float32)
            temperature = torch.where(greedy, 1.0, temperature)
            scores.div_(temperature.repeat_interleave(per_row, output_size=num_rows)[:, None])
        top_p = None
        if sampling_metadata.top_p is not None:
            top_p = per_request(sampling_metadata.top_p)
            top_p = top_p.repeat_interleave(per_row, output_size=num_rows)
        if sampling_metadata.top_k is not None and top_p is None and top_k_host is not None:
            # Top-k alone, known on the host: no read of k from the device
            # (vLLM's CPU path reads k.max()), no work where k keeps every column.
            limited = top_k_host[top_k_host < width]  # a guided twin may have none
            if limited.size:
                largest = int(limited.max())
                top_k = torch.from_numpy(np.repeat(np.minimum(top_k_host, width), counts)).to(device)
                kth = scores.topk(largest, dim=-1).values
                kth = kth.gather(1, (top_k.clamp(1, largest) - 1)[:, None])
                kth = kth.masked_fill_((top_k >= width)[:, None], float("-inf"))
                scores = scores.masked_fill_(scores < kth, float("-inf"))
        else:
            top_k = None
            if sampling_metadata.top_k is not None:
                top_k = per_request(sampling_metadata.top_k).clamp(max=width)
                top_k = top_k.repeat_interleave(per_row, output_size=num_rows)
            scores = apply_top_k_top_p(scores, top_k, top_p)
        return scores.softmax(dim=-1, dtype=torch.float32)

    def _draft_distributions(self, req_ids, num_draft, draft_ids, columns: Columns | None, probs,
                             batch_rows: list[int] | None = None):
        """The scheduled drafts as column indices, and their q on the same columns
        (of requests at `batch_rows`; None: the first len(req_ids))."""
        if not sum(num_draft):
            empty = torch.zeros(0, dtype=torch.int64, device=probs.device)
            return empty, probs.new_zeros((0, probs.shape[-1]))
        scheduled = self.input_batch.spec_token_ids
        scheduled = scheduled[: len(req_ids)] if batch_rows is None else [scheduled[i] for i in batch_rows]
        return self.drafter.scheduled_drafts(req_ids, num_draft, draft_ids, columns, probs.shape[-1],
                                             scheduled)

    def _bookkeeping_without_generators(self, bookkeeping, *args, **kwargs):
        """vLLM's bookkeeping, without rewinding generators this step did not use."""
        if not getattr(self, "_generators_untouched", False):
            return bookkeeping(*args, **kwargs)
        self._generators_untouched = False
        generators = self.input_batch.generators
        num_reqs = self.input_batch.num_reqs
        discarded = np.nonzero(self.discard_request_mask.np[:num_reqs])[0].tolist()
        hidden = {i: generators.pop(i) for i in discarded if i in generators}
        try:
            return bookkeeping(*args, **kwargs)
        finally:
            generators.update(hidden)
