"""ZipAR inside vLLM's V1 runner: raster positions for fed tokens, and ZipAR's own sampling step.

Part of the SJD model runner (patches/sjd_runner.py) when the speculative
method is "zipar" (the drafter is vllm_sjd.zipar.ZipARProposer). Overrides
vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs (extended:
after vLLM has computed positions and the KV slot mapping, the tokens of a
ZipAR image get their raster positions in `self.positions`, or in
`self.mrope_positions` for M-RoPE models) and replaces `_sample` for the
engine. Checked on vLLM 0.32.0 and 0.33.0.

How ZipAR rides on speculative decoding: a step feeds [the token vLLM calls
the bonus, the "drafts"] = this step's planned feeds (core/zipar.py); every
row samples what its feed targets (the layout's mask at that raster
position, guidance, temperature, top-k); all drafts are accepted; the bonus
is the first of the next step's feeds and the rest become the next drafts.
So vLLM's output tokens are the stream in generation order, and its KV cache
holds them in that order, which is ZipAR's context.
"""

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput

from vllm_sjd.core.drafting import sample_inverse_cdf
from vllm_sjd.core.rng import TOKEN_STREAM, counter_uniforms
from vllm_sjd.core.verify import PLACEHOLDER
from vllm_sjd.core.zipar import NO_TARGET
from vllm_sjd.patches.sjd_sampling import _uses_logits_processing
from vllm_sjd.zipar import ZipARProposer


class ZipARRunnerMixin:
    """ZipAR's overrides of the SJD runner (active only with a ZipARProposer)."""

    @property
    def _zipar(self) -> ZipARProposer | None:
        proposer = getattr(self, "_proposer", None)
        return proposer if isinstance(proposer, ZipARProposer) else None

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if self._zipar is not None:
            self._zipar_positions(np.asarray(num_scheduled_tokens, dtype=np.int64))
        return result

    def _zipar_positions(self, num_scheduled: np.ndarray) -> None:
        """Move each fed image token to its raster position (the slot mapping keeps
        vLLM's: the KV cache stays in generation order)."""
        num_reqs = self.input_batch.num_reqs
        computed = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        first_token = np.cumsum(num_scheduled[:num_reqs]) - num_scheduled[:num_reqs]
        offsets = None
        for i, req_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            stream = self._zipar.peek(req_id)
            if stream is None or not stream.stream:
                continue
            prompt_len = self.requests[req_id].num_prompt_tokens
            outputs = np.arange(num_scheduled[i], dtype=np.int64) + computed[i] - prompt_len
            fed = np.nonzero(outputs >= 0)[0]
            if not fed.size:
                continue
            raster = np.array([stream.stream[k].position for k in outputs[fed]], dtype=np.int64)
            if offsets is None:
                offsets = np.zeros(int(num_scheduled[:num_reqs].sum()), dtype=np.int64)
            offsets[first_token[i] + fed] = raster - outputs[fed]
        if offsets is not None:
            self._shift_positions(offsets)  # patches/row_lookahead_runner.py

    def _sample_zipar(self, logits, spec_decode_metadata, counts: np.ndarray, pairs, greedy):
        """Every row draws what its feed targets; the step's output and next drafts follow."""
        sampling_metadata = self.input_batch.sampling_metadata
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        entries = self._layout_entries(req_ids)
        vocab_size, device = logits.shape[-1], logits.device
        discarded = self.discard_request_mask.np[:num_reqs].astype(bool)
        prompt_lens = np.array([prompt_len for _, prompt_len in entries], dtype=np.int64)
        num_out = self.input_batch.num_tokens_no_spec[:num_reqs].astype(np.int64) - prompt_lens
        streams = [self._zipar.stream(r, grid) for r, (grid, _) in zip(req_ids, entries)]

        # What each row samples, as a raster index from the first generated token.
        first_row = np.cumsum(counts) - counts
        targets = np.full(int(counts.sum()), NO_TARGET, dtype=np.int64)
        for i, stream in enumerate(streams):
            if discarded[i]:
                continue
            if stream is None:
                targets[first_row[i] + counts[i] - 1] = num_out[i]  # plain AR
                continue
            for j in range(counts[i]):
                targets[first_row[i] + j] = stream.target_of(num_out[i] - 1 + j)
        request_of_row = np.repeat(np.arange(num_reqs), counts)

        columns = self._layouts.columns(entries, vocab_size, device)
        if columns is None or _uses_logits_processing(sampling_metadata):
            scores = self._vllm_logits_processing(logits.float(), spec_decode_metadata)
            scores = scores if columns is None else columns.select(scores)
        else:
            scores = columns.select(logits).float()
        if pairs.cond:
            self._guide(scores, pairs, counts)
        mask = self._layouts.masks_at(
            entries, request_of_row, targets.clip(min=0), vocab_size, device, columns
        )
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        top_k = None if sampling_metadata.top_k is None else self.input_batch.top_k_cpu[:num_reqs]
        greedy_rows = torch.from_numpy(greedy).to(device)
        probs = self._processed_probs(scores, counts, sampling_metadata, greedy_rows, top_k)

        # Counter-based numbers keyed by (request, absolute position): a seeded
        # image draws the same in any batch, however its stream is cut into steps.
        seeds = [self.requests[r].sampling_params.seed for r in req_ids]
        keys = np.array([self._zipar.key(r, s) for r, s in zip(req_ids, seeds)], dtype=np.int64)
        absolute = prompt_lens[request_of_row] + targets.clip(min=0)
        uniforms = counter_uniforms(keys[request_of_row], absolute, 0, TOKEN_STREAM)
        drawn = sample_inverse_cdf(probs, torch.from_numpy(uniforms).to(device))
        drawn = torch.where(greedy_rows[torch.from_numpy(request_of_row).to(device)],
                            probs.argmax(dim=-1), drawn)
        if columns is not None:
            drawn = columns.tokens(drawn)
        drawn = drawn.tolist()  # the step's one read: the tokens plan the next feeds
        for c, t in zip(pairs.cond, pairs.twin):
            # The twin commits exactly the conditional request's tokens.
            rows = range(counts[c])
            for j in rows:
                drawn[first_row[t] + j] = drawn[first_row[c] + j]

        outputs = np.full((num_reqs, int(counts.max(initial=1))), PLACEHOLDER, dtype=np.int64)
        for i, (req_id, stream) in enumerate(zip(req_ids, streams)):
            if discarded[i]:
                continue
            rows = range(first_row[i], first_row[i] + counts[i])
            if stream is None:
                outputs[i, 0] = drawn[rows[-1]]
                continue
            for row in rows:
                if targets[row] != NO_TARGET:
                    stream.record(int(targets[row]), drawn[row])
            stream.advance(num_out[i] - 1 + counts[i])
            emitted = stream.stream[num_out[i] : num_out[i] + counts[i]]
            outputs[i, : len(emitted)] = stream.tokens_of(emitted)
            self._zipar.set_drafts(req_id, stream.tokens_of(stream.stream[num_out[i] + counts[i] :]))
        self._generators_untouched = True
        sampled = torch.from_numpy(outputs).to(device=device, dtype=torch.int32)
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=None)

    def _propose_zipar(self, sampled_token_ids) -> list[list[int]]:
        req_ids = self.input_batch.req_ids[: len(sampled_token_ids)]
        return [self._zipar.take_drafts(r) for r in req_ids]
