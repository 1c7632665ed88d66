"""The SJD scheduler: vLLM's V1 scheduler plus classifier-free guidance pairs.

Subclasses vllm.v1.core.sched.scheduler.Scheduler (engine-core process;
checked on vLLM 0.32.0 and 0.33.0), named by `scheduler_config.scheduler_cls` for SJD
engines and image models (patches/speculative_config.py sets it):
- `add_request`: a request whose extra_args ask for guidance (s > 1, see
  vllm_sjd/guidance.py) gets an unconditional twin request, built from the
  token ids it carries and queued right behind it;
- `schedule`: lowers this step's token budget to the end of the last whole
  window that fits (no decoding request's window cut short, no pair split), so
  a seeded request's windows, and with them its tokens, do not depend on what
  else is in flight; where the two members were still given different draft
  counts (the context end cut one short), trims the longer to the shorter, so
  both verify the same window;
- `update_from_output`: a member the runner held back (it sampled without its
  partner) is rolled back to redo its last token, and put back to waiting if
  its partner is waiting, so the pair is admitted together; when one member
  finishes the other is finished with it; the twin's outputs never reach the
  client (no tokens, no usage, no metrics);
- `finish_requests`: aborting the conditional request aborts its twin.

Why a scheduler: vLLM has no notion of requests that must step together, and
the twin must hold KV blocks of its own, which only the scheduler allocates.
Retire when vLLM schedules request groups (or guidance) itself.
"""

import time
from collections.abc import Iterable

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from vllm_sjd.contract import UNCONDITIONAL_REQUEST_SUFFIX
from vllm_sjd.guidance import (
    guidance_of,
    unconditional_extra_args,
    unconditional_request_id,
)


class SJDScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._twin_of: dict[str, str] = {}  # conditional request id -> twin id
        self._cond_of: dict[str, str] = {}  # twin id -> conditional request id
        self._finished_pairs: list[str] = []

    # Pairing --------------------------------------------------------------
    def _partner(self, req_id: str) -> str | None:
        return self._twin_of.get(req_id) or self._cond_of.get(req_id)

    def add_request(self, request: Request) -> None:
        is_new = request.request_id not in self.requests
        super().add_request(request)
        params = request.sampling_params
        guidance = guidance_of(params.extra_args) if params is not None else None
        if not is_new or guidance is None:
            return
        twin_params = params.clone()
        twin_params.extra_args = unconditional_extra_args(params.extra_args, request.request_id)
        twin_params.logprobs = twin_params.prompt_logprobs = None
        twin = Request(
            request_id=unconditional_request_id(request.request_id),
            prompt_token_ids=list(guidance.unconditional_prompt_token_ids),
            sampling_params=twin_params,
            pooling_params=None,
            client_index=request.client_index,
            arrival_time=request.arrival_time,
            lora_request=request.lora_request,
            cache_salt=request.cache_salt,
            priority=request.priority,
            block_hasher=request._block_hasher,
        )
        self._twin_of[request.request_id] = twin.request_id
        self._cond_of[twin.request_id] = request.request_id
        super().add_request(twin)

    def schedule(self, *args, **kwargs):
        budget = self.max_num_scheduled_tokens
        self.max_num_scheduled_tokens = self._whole_window_budget(budget)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = budget
        spec_tokens = output.scheduled_spec_decode_tokens
        for cond_id, twin_id in self._twin_of.items():
            if cond_id not in output.num_scheduled_tokens or twin_id not in output.num_scheduled_tokens:
                continue
            cond_n = len(spec_tokens.get(cond_id, ()))
            twin_n = len(spec_tokens.get(twin_id, ()))
            if cond_n != twin_n:
                self._trim_drafts(output, cond_id if cond_n > twin_n else twin_id, min(cond_n, twin_n))
        return output

    def _whole_window_budget(self, budget: int) -> int:
        """The part of `budget` that ends after a whole window of every request it reaches.

        vLLM gives the running requests, in order, what they need until the
        budget runs out, cutting the last one's drafts short. A shorter window
        changes the drafts of every later step, so a seeded image would depend
        on its batch. A prefill chunk may end anywhere (its sample is discarded
        and its generator rewound), so it takes whatever is left.
        """
        running = {r.request_id for r in self.running}
        used = cut = 0
        half_pairs: set[str] = set()  # conditional ids of pairs with one member counted
        for request in self.running:
            need = request.num_tokens_with_spec - request.num_computed_tokens
            if need <= 0:
                continue
            prefilling = request.num_tokens - request.num_computed_tokens > 1
            if used + need > budget:
                return budget if prefilling or cut == 0 else cut
            used += need
            req_id = request.request_id
            if self._partner(req_id) in running:
                half_pairs ^= {self._cond_of.get(req_id, req_id)}
            if not half_pairs:
                cut = used
        return budget

    def _trim_drafts(self, output, req_id: str, keep: int) -> None:
        drafts = output.scheduled_spec_decode_tokens[req_id]
        cut = len(drafts) - keep
        if keep:
            output.scheduled_spec_decode_tokens[req_id] = drafts[:keep]
        else:
            del output.scheduled_spec_decode_tokens[req_id]
        output.num_scheduled_tokens[req_id] -= cut
        output.total_num_scheduled_tokens -= cut
        request = self.requests[req_id]
        request.num_computed_tokens -= cut
        request.num_in_flight_tokens -= cut

    def update_from_output(self, scheduler_output, model_runner_output):
        held = self._held_members(scheduler_output, model_runner_output)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request in held:
            if not request.is_finished():
                # Redo the last known token (and the same window) next step.
                request.num_computed_tokens = request.num_tokens - 1
        self._regroup(held)
        self._finish_partners()
        self._hide_twins(outputs)
        return outputs

    def _held_members(self, scheduler_output, model_runner_output) -> list[Request]:
        """Pair members that sampled this step but got no tokens: the runner held them."""
        if not self._twin_of:
            return []
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        held = []
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if (
                request is None
                or self._partner(req_id) is None
                or request.is_prefill_chunk
                or req_id not in index
            ):
                continue
            if sampled and not sampled[index[req_id]]:
                held.append(request)
        return held

    def _regroup(self, held: list[Request]) -> None:
        """A held member whose partner is waiting goes back to waiting, in front of it.

        Otherwise a running member could hold KV blocks its partner needs to
        be admitted, and neither would ever run.
        """
        for request in held:
            partner = self.requests.get(self._partner(request.request_id) or "")
            if (
                partner is None
                or request.status != RequestStatus.RUNNING
                or partner.status == RequestStatus.RUNNING
                or partner.is_finished()
            ):
                continue
            if partner not in self.waiting:
                continue  # e.g. waiting for remote KV: leave it to vLLM
            self.running.remove(request)
            self._preempt_request(request, time.monotonic())
            self.waiting.remove_request(request)
            self.waiting.remove_request(partner)
            cond, twin = (
                (request, partner) if request.request_id in self._twin_of else (partner, request)
            )
            self.waiting.prepend_request(twin)
            self.waiting.prepend_request(cond)

    def _finish_partners(self) -> None:
        """When one member of a pair finished, finish the other; forget done pairs."""
        done = []
        for cond_id, twin_id in self._twin_of.items():
            cond, twin = self.requests.get(cond_id), self.requests.get(twin_id)
            cond_done = cond is None or cond.is_finished()
            twin_done = twin is None or twin.is_finished()
            if cond_done and not twin_done:
                super().finish_requests(twin_id, RequestStatus.FINISHED_ABORTED)
            elif twin_done and not cond_done:
                # The twin cannot end first (same tokens, same limits); if it
                # ever does, the image cannot be guided any further.
                super().finish_requests(cond_id, RequestStatus.FINISHED_ERROR)
            if cond_done or twin_done:
                done.append(cond_id)
        self._finished_pairs = done

    def _hide_twins(self, outputs) -> None:
        for engine_core_outputs in outputs.values():
            engine_core_outputs.outputs = [
                o for o in engine_core_outputs.outputs if not _is_twin(o.request_id)
            ]
            if engine_core_outputs.finished_requests:
                engine_core_outputs.finished_requests = {
                    r for r in engine_core_outputs.finished_requests if not _is_twin(r)
                }
        self._forget_finished_pairs()

    def _forget_finished_pairs(self) -> None:
        for cond_id in self._finished_pairs:
            self._cond_of.pop(self._twin_of.pop(cond_id, ""), None)
        self._finished_pairs = []

    def finish_requests(self, request_ids: str | Iterable[str] | None, finished_status):
        if request_ids is not None:
            request_ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
            request_ids += [self._twin_of[r] for r in request_ids if r in self._twin_of]
        finished = super().finish_requests(request_ids, finished_status)
        self._finish_partners()
        self._forget_finished_pairs()
        return finished

    def make_spec_decoding_stats(self, spec_decoding_stats, *args, request_id=None, **kwargs):
        if request_id in self._cond_of:
            return spec_decoding_stats  # the twin's acceptance is its partner's
        return super().make_spec_decoding_stats(
            spec_decoding_stats, *args, request_id=request_id, **kwargs
        )


def _is_twin(request_id: str) -> bool:
    return request_id.endswith(UNCONDITIONAL_REQUEST_SUFFIX)
