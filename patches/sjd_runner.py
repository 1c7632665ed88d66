"""The SJD model runner: vLLM's V1 runner plus SJD's draft/verify plumbing.

Subclasses vllm.v1.worker.gpu_model_runner.GPUModelRunner (GPU) and
vllm.v1.worker.cpu_model_runner.CPUModelRunner (CPU), overriding (worker
process; checked on vLLM 0.32.0):
- `_sample`: masks each row to what an image request's layout allows at its
  absolute position, then keeps this step's verified rows (the processed
  target logits, captured by patches/verified_logits.py, and the bonus rows);
- `propose_draft_token_ids`: hands them, with the request ids, the accepted
  counts and the positions, to the SJD proposer;
- `_get_spec_decode_draft_probs`: gives the rejection sampler q from the
  proposer, looked up by request id;
- `_update_states`: makes the proposer forget finished and preempted requests.

Why not custom_class alone: its `propose(...)` sees neither request ids, nor
logits, nor a way to return q. Retire when custom_class proposers receive the
verified probabilities and can return draft probabilities.
"""

from dataclasses import dataclass

import torch
from vllm.v1.sample import rejection_sampler
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_sjd.core.window import StepRows
from vllm_sjd.patches.verified_logits import capture_verified_logits
from vllm_sjd.proposer import SJDProposer


@dataclass
class _StepLogits:
    bonus_logits: torch.Tensor  # [B, V] raw logits of each request's last row
    target_logits: torch.Tensor | None  # [sum(n), V] processed, or None
    num_draft_tokens: list[int]  # [B]


class SJDModelRunnerMixin:
    """Overrides shared by the GPU and CPU SJD runners."""

    drafter: SJDProposer

    def _check_sjd_drafter(self) -> None:
        if not isinstance(getattr(self, "drafter", None), SJDProposer):
            raise RuntimeError(
                "the SJD model runner needs the SJD proposer; start the engine with "
                'speculative_config={"method": "sjd", ...}'
            )
        self._sjd_step: _StepLogits | None = None

    def _layout_entries(self, req_ids):
        return self.drafter.layouts.lookup(
            req_ids,
            lambda r: self.requests[r].sampling_params.extra_args,
            lambda r: self.requests[r].num_prompt_tokens,
        )

    def _apply_layout(self, logits, spec_decode_metadata) -> None:
        """Mask each row to the tokens its absolute position may hold (image requests)."""
        num_reqs = self.input_batch.num_reqs
        entries = self._layout_entries(self.input_batch.req_ids[:num_reqs])
        if spec_decode_metadata is None:
            counts = torch.ones(num_reqs, dtype=torch.int64)
        else:
            counts = torch.tensor(spec_decode_metadata.num_draft_tokens, dtype=torch.int64) + 1
        # Row j of a request predicts token index num_tokens_no_spec + j.
        first = torch.from_numpy(self.input_batch.num_tokens_no_spec[:num_reqs].astype("int64"))
        mask = self.drafter.layouts.row_masks(
            entries, first, counts, logits.shape[-1], logits.device
        )
        if mask is not None:
            logits.masked_fill_(~mask, float("-inf"))

    def _sample(self, logits, spec_decode_metadata):
        num_reqs = self.input_batch.num_reqs
        self._apply_layout(logits, spec_decode_metadata)
        if spec_decode_metadata is None:
            bonus_logits = logits[:num_reqs].clone()  # the sampler may edit in place
            num_draft_tokens = [0] * num_reqs
        else:
            bonus_logits = logits[spec_decode_metadata.bonus_logits_indices]
            num_draft_tokens = list(spec_decode_metadata.num_draft_tokens)
        with capture_verified_logits() as verified:
            output = super()._sample(logits, spec_decode_metadata)
        self._sjd_step = _StepLogits(bonus_logits, verified.target_logits, num_draft_tokens)
        return output

    def _get_spec_decode_draft_probs(self, spec_decode_metadata):
        return self.drafter.draft_probs(
            self.input_batch.req_ids,
            spec_decode_metadata.num_draft_tokens,
            spec_decode_metadata.draft_token_ids,
            self.input_batch.vocab_size,
        )

    def propose_draft_token_ids(
        self,
        scheduler_output,
        sampled_token_ids,
        sampling_metadata,
        hidden_states,
        sample_hidden_states,
        aux_hidden_states,
        spec_decode_metadata,
        common_attn_metadata,
        slot_mappings,
    ):
        step, self._sjd_step = self._sjd_step, None
        assert step is not None and isinstance(sampled_token_ids, list)
        req_ids = list(self.input_batch.req_ids)
        num_reqs = len(req_ids)
        rows = self._verified_rows(step, sampled_token_ids, sampling_metadata)
        num_tokens = torch.from_numpy(
            self.input_batch.num_tokens_no_spec[:num_reqs].astype("int64")
        )
        num_slots = self.drafter.num_slots
        allowed = self.drafter.layouts.row_masks(
            self._layout_entries(req_ids),
            num_tokens,
            torch.full((num_reqs,), num_slots, dtype=torch.int64),
            step.bonus_logits.shape[-1],
            step.bonus_logits.device,
        )
        return self.drafter.propose_window(
            req_ids,
            rows,
            num_tokens=num_tokens,
            seeds=[self.requests[r].sampling_params.seed for r in req_ids],
            greedy=_greedy_mask(sampling_metadata, num_reqs),
            has_output=[len(t) > 0 for t in sampled_token_ids],
            allowed=None if allowed is None else allowed.view(num_reqs, num_slots, -1),
        )

    def _verified_rows(self, step: _StepLogits, sampled_token_ids, sampling_metadata):
        num_reqs = len(sampled_token_ids)
        device = step.bonus_logits.device
        n = torch.tensor(step.num_draft_tokens, dtype=torch.int64, device=device)
        produced = torch.tensor(
            [len(t) for t in sampled_token_ids], dtype=torch.int64, device=device
        )
        # a = produced - 1; a request that produced nothing keeps no rows.
        accepted = torch.where(produced > 0, produced - 1, n)
        cu_one_per_request = torch.arange(1, num_reqs + 1, device=device, dtype=torch.int32)
        bonus = rejection_sampler.apply_sampling_constraints(
            step.bonus_logits.to(torch.float32), cu_one_per_request, sampling_metadata
        )
        if step.target_logits is None or step.target_logits.shape[0] == 0:
            target_probs = bonus.new_zeros((0, bonus.shape[-1]))
        else:
            target_probs = step.target_logits.softmax(dim=-1, dtype=torch.float32)
        # Rows stay on the model's device; so do the windows built from them.
        return StepRows(
            target_probs=target_probs,
            bonus_probs=bonus.softmax(dim=-1, dtype=torch.float32),
            num_draft_tokens=n,
            num_accepted=accepted,
        )

    def _update_states(self, scheduler_output):
        result = super()._update_states(scheduler_output)
        gone = set(scheduler_output.finished_req_ids)
        gone.update(scheduler_output.preempted_req_ids or ())
        if gone:
            self.drafter.evict(gone)
        return result


def _greedy_mask(sampling_metadata, num_reqs: int) -> torch.Tensor:
    if sampling_metadata.all_greedy:
        return torch.ones(num_reqs, dtype=torch.bool)
    if sampling_metadata.all_random or sampling_metadata.temperature is None:
        return torch.zeros(num_reqs, dtype=torch.bool)
    temperature = sampling_metadata.temperature[:num_reqs].cpu()
    return temperature == rejection_sampler.GREEDY_TEMPERATURE


class SJDGPUModelRunner(SJDModelRunnerMixin, GPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self._check_sjd_drafter()


class SJDCPUModelRunner(SJDModelRunnerMixin, CPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self._check_sjd_drafter()
