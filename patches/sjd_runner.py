"""The SJD model runner: vLLM's V1 runner plus SJD's draft/verify plumbing.

Subclasses vllm.v1.worker.gpu_model_runner.GPUModelRunner (GPU) and
vllm.v1.worker.cpu_model_runner.CPUModelRunner (CPU), overriding (worker
process; checked on vLLM 0.32.0 and 0.33.0):
- `_sample`: blends each guided pair's logits (classifier-free guidance, see
  vllm_sjd/guidance.py and patches/cfg_scheduler.py), masks each row to what an
  image request's layout allows at its absolute position, samples, copies the
  conditional request's tokens to its unconditional twin, holds a pair member
  that came without its partner, and keeps this step's verified rows (the
  processed target logits, captured by patches/verified_logits.py, and the
  bonus rows);
- `_bookkeeping_sync`: puts a held member's seeded generator back exactly;
- `propose_draft_token_ids`: hands them, with the request ids, the accepted
  counts and the positions, to the SJD proposer;
- `_get_spec_decode_draft_probs`: gives the rejection sampler q from the
  proposer, looked up by request id;
- `_update_states`: forgets finished and preempted requests.
It also times forward passes of 1, 2, 4, ... tokens with vLLM's `_dummy_run`
when the engine starts (`measure_forward_costs`, called by the SJD worker),
the curve SJD's dynamic window reads.

Without speculation (plain AR on an image model) the same runner applies
layouts and guidance; there is no proposer then.

Why not custom_class alone: its `propose(...)` sees neither request ids, nor
logits, nor a way to return q. Retire when custom_class proposers receive the
verified probabilities and can return draft probabilities.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.sample import rejection_sampler
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_sjd.core import cpu_kernels
from vllm_sjd.core.compiled import set_compiled
from vllm_sjd.core.window import StepRows
from vllm_sjd.guidance import (
    conditional_partner_of,
    guidance_of,
    guide_pairs,
    unconditional_request_id,
)
from vllm_sjd.layouts.constraints import LayoutConstraints
from vllm_sjd.patches.row_lookahead_runner import RowLookaheadRunnerMixin
from vllm_sjd.patches.sjd_sampling import SJDSamplingMixin, samples_without_logprobs
from vllm_sjd.patches.verified_logits import capture_verified_logits
from vllm_sjd.patches.zipar_runner import ZipARRunnerMixin
from vllm_sjd.proposer import SJDProposer
from vllm_sjd.zipar import ZipARProposer


@dataclass
class _StepLogits:
    num_draft_tokens: list[int]  # [B]
    vocab_size: int  # of the logits
    # SJD's own sampling step: the verified rows, on the layout's columns.
    rows: StepRows | None = None
    # vLLM's samplers: what SJD needs to compute the same rows.
    bonus_logits: torch.Tensor | None = None  # [B, V] raw logits of each request's last row
    target_logits: torch.Tensor | None = None  # [sum(n), V] processed, or None
    target_probs: torch.Tensor | None = None  # their softmax, where the verifier computed it


@dataclass
class _GuidedPairs:
    """This step's guided pairs, as batch indices."""

    cond: list[int]
    twin: list[int]
    scale: list[float]


class SJDModelRunnerMixin(ZipARRunnerMixin, RowLookaheadRunnerMixin, SJDSamplingMixin):
    """Overrides shared by the GPU and CPU SJD runners."""

    drafter: SJDProposer  # only under speculation

    def _init_sjd(self) -> None:
        # Plain AR has no proposer: layouts and guidance only.
        self._proposer: SJDProposer | ZipARProposer | None = getattr(self, "drafter", None)
        if self.speculative_config is not None and not isinstance(
            self._proposer, (SJDProposer, ZipARProposer)
        ):
            raise RuntimeError(
                "the SJD model runner needs the SJD or ZipAR proposer; start the engine with "
                'speculative_config={"method": "sjd" | "zipar", ...}'
            )
        self._sjd_step: _StepLogits | None = None
        self._sjd_pairs = _GuidedPairs([], [], [])
        self._layouts = LayoutConstraints()
        # request id -> ("cond", twin id, scale) | ("twin", cond id) | None
        self._guidance_roles: dict[str, tuple | None] = {}
        self.num_held_steps = 0  # pair members held back for want of their partner
        # Steps sampled by SJD's own step, on layout columns or the whole
        # vocabulary, and by vLLM's samplers (a request wanted logprobs).
        self.sampling_steps = {"columns": 0, "vocabulary": 0, "vllm": 0}
        self._held_generator_states: dict[int, torch.Tensor] = {}  # batch index -> state
        # Row lookahead (patches/row_lookahead_runner.py): this step's rows, and
        # the predictions made from them for the proposer.
        self._lookahead_rows = None
        self._predicted = None
        # The verifier's and the window's tensor work as compiled graphs on a
        # GPU if asked (core/compiled.py), unless vLLM runs eager.
        settings = getattr(self._proposer, "config", None)
        set_compiled(getattr(settings, "compile_step", False) and self.device.type == "cuda"
                     and not self.model_config.enforce_eager)
        if self.device.type == "cpu":
            cpu_kernels.warm_up()  # SJD's step runs as numba kernels on a CPU: compile them now

    def _layout_entries(self, req_ids):
        return self._layouts.lookup(
            req_ids,
            lambda r: self.requests[r].sampling_params.extra_args,
            lambda r: self.requests[r].num_prompt_tokens,
        )

    def _row_counts(self, spec_decode_metadata, num_reqs: int) -> np.ndarray:
        if spec_decode_metadata is None:
            return np.ones(num_reqs, dtype=np.int64)
        return np.asarray(spec_decode_metadata.num_draft_tokens, dtype=np.int64) + 1

    def _apply_layout(self, logits, counts: np.ndarray) -> None:
        """Mask each row to the tokens its absolute position may hold (image requests)."""
        num_reqs = self.input_batch.num_reqs
        entries = self._layout_entries(self.input_batch.req_ids[:num_reqs])
        # Row j of a request predicts token index num_tokens_no_spec + j.
        first = self.input_batch.num_tokens_no_spec[:num_reqs]
        mask = self._layouts.row_masks(entries, first, counts, logits.shape[-1], logits.device)
        if mask is not None:
            logits.masked_fill_(~mask, float("-inf"))

    # Classifier-free guidance ---------------------------------------------
    def _guidance_role(self, req_id: str):
        if req_id not in self._guidance_roles:
            extra_args = self.requests[req_id].sampling_params.extra_args
            guidance = guidance_of(extra_args)
            cond_id = conditional_partner_of(extra_args)
            if guidance is not None:
                role = ("cond", unconditional_request_id(req_id), guidance.scale)
            elif cond_id is not None:
                role = ("twin", cond_id)
            else:
                role = None
            self._guidance_roles[req_id] = role
        return self._guidance_roles[req_id]

    def _pair_up(self, counts: np.ndarray, spec_decode_metadata) -> tuple[_GuidedPairs, list[int]]:
        """Guided pairs that sample together this step, and members to hold.

        A pair is verified together only when both members sample in this step
        at the same output position with the same drafts. A member sampling
        without its partner is held: its tokens are discarded (the scheduler
        rolls it back) and it keeps its window, so neither member ever runs
        ahead of the other.
        """
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        pairs = _GuidedPairs([], [], [])
        held: list[int] = []
        roles = [self._guidance_role(r) for r in req_ids]
        if not any(roles):
            return pairs, held
        sampling = ~self.discard_request_mask.np[:num_reqs].astype(bool)
        num_out = self.input_batch.num_tokens_no_spec[:num_reqs].astype(np.int64) - np.array(
            [self.requests[r].num_prompt_tokens for r in req_ids], dtype=np.int64
        )
        # The drafts each request verifies, as the host scheduled them.
        drafts = self.input_batch.spec_token_ids if spec_decode_metadata is not None else None
        index = self.input_batch.req_id_to_index
        for i, role in enumerate(roles):
            if role is None or not sampling[i]:
                continue
            j = index.get(role[1])
            aligned = (
                j is not None
                and j < num_reqs
                and sampling[j]
                and counts[i] == counts[j]
                and num_out[i] == num_out[j]
                and (drafts is None or drafts[i] == drafts[j])
            )
            if not aligned:
                held.append(i)
            elif role[0] == "cond":
                pairs.cond.append(i)
                pairs.twin.append(j)
                pairs.scale.append(role[2])
        return pairs, held

    def _guide(self, logits, pairs: _GuidedPairs, counts: np.ndarray) -> None:
        """Both members' rows become uncond + s * (cond - uncond) (image span only)."""
        num_reqs = self.input_batch.num_reqs
        guide_pairs(
            logits,
            list(zip(pairs.cond, pairs.twin, pairs.scale)),
            counts,
            self.input_batch.num_tokens_no_spec[:num_reqs],
            self._layout_entries(self.input_batch.req_ids[:num_reqs]),
        )

    def _sample(self, logits, spec_decode_metadata):
        num_reqs = self.input_batch.num_reqs
        lookahead, self._lookahead_rows = self._lookahead_rows, None
        if lookahead is not None:  # the window's rows go on; the lookahead's are predictions
            logits, lookahead_logits = logits.split(
                [lookahead.num_window_rows, logits.shape[0] - lookahead.num_window_rows]
            )
        counts = self._row_counts(spec_decode_metadata, num_reqs)
        pairs, held = self._pair_up(counts, spec_decode_metadata)
        if held:
            self._hold(held)
        self._sjd_pairs = pairs
        self._predicted = None if lookahead is None else self._lookahead_predictions(
            lookahead_logits, lookahead, pairs, self._greedy_mask(num_reqs)
        )
        sampling_metadata = self.input_batch.sampling_metadata
        if self._zipar is not None:
            # ZipAR's own step (patches/zipar_runner.py); no logprobs.
            self.sampling_steps["columns"] += 1
            return self._sample_zipar(
                logits, spec_decode_metadata, counts, pairs, self._greedy_mask(num_reqs)
            )
        if self._proposer is not None and samples_without_logprobs(sampling_metadata):
            # SJD's own step (patches/sjd_sampling.py).
            greedy = self._greedy_mask(num_reqs)
            output, rows = self._sample_on_columns(
                logits, spec_decode_metadata, counts, pairs, greedy
            )
            self._sjd_step = _StepLogits((counts - 1).tolist(), logits.shape[-1], rows=rows)
            self.sampling_steps["vocabulary" if rows.columns is None else "columns"] += 1
            return output
        self.sampling_steps["vllm"] += 1
        logits = logits.float()  # guidance in float32, as vLLM's samplers would cast anyway
        if pairs.cond:
            self._guide(logits, pairs, counts)
        self._apply_layout(logits, counts)
        if spec_decode_metadata is None:
            bonus_logits = logits[:num_reqs].clone()  # the sampler may edit in place
            num_draft_tokens = [0] * num_reqs
        else:
            bonus_logits = logits[spec_decode_metadata.bonus_logits_indices]
            num_draft_tokens = list(spec_decode_metadata.num_draft_tokens)
        with capture_verified_logits() as verified:
            output = super()._sample(logits, spec_decode_metadata)
        if pairs.cond:
            # The twin commits exactly the conditional request's tokens.
            sampled = output.sampled_token_ids
            sampled[pairs.twin] = sampled[pairs.cond]
        if self._proposer is not None:
            self._sjd_step = _StepLogits(
                num_draft_tokens,
                logits.shape[-1],
                bonus_logits=bonus_logits,
                target_logits=verified.target_logits,
                target_probs=verified.target_probs,
            )
        return output

    def _hold(self, held: list[int]) -> None:
        """Discard these rows' samples like a partial prefill's; the scheduler rolls back.

        Marked before sampling, so that every rewind of a discarded seeded
        sample sees them (patches/cpu_generator_rewind.py on CPU). Their
        generators' states are kept and put back after vLLM's bookkeeping:
        the rejection sampler draws more than the one sample vLLM's GPU
        rewind undoes, and a held member must redo the same draws.
        """
        self.discard_request_mask.np[held] = True
        self.num_held_steps += len(held)
        generators = self.input_batch.generators
        self._held_generator_states = {
            i: generators[i].get_state() for i in held if i in generators
        }

    def _bookkeeping_sync(self, *args, **kwargs):
        result = self._bookkeeping_without_generators(super()._bookkeeping_sync, *args, **kwargs)
        states, self._held_generator_states = self._held_generator_states, {}
        generators = self.input_batch.generators
        for i, state in states.items():
            generators[i].set_state(state)
        return result

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
        if self._zipar is not None:
            self._sjd_pairs = _GuidedPairs([], [], [])
            return self._propose_zipar(sampled_token_ids)
        step, self._sjd_step = self._sjd_step, None
        predicted, self._predicted = self._predicted, None
        assert step is not None and isinstance(sampled_token_ids, list)
        pairs, self._sjd_pairs = self._sjd_pairs, _GuidedPairs([], [], [])
        # vLLM's per-batch-size table (num_speculative_tokens_per_batch_size)
        # sets how many drafts the next step verifies; without one, SJD's
        # dynamic window may take fewer.
        max_drafts = scheduler_output.num_spec_tokens_to_schedule
        if self.drafter.builds_nothing_for(max_drafts):
            return [[] for _ in sampled_token_ids]
        req_ids = list(self.input_batch.req_ids)
        num_reqs = len(req_ids)
        seeds = [self.requests[r].sampling_params.seed for r in req_ids]
        mirror = list(zip(pairs.twin, pairs.cond))
        accepted = [
            max(len(t) - 1, 0) if t else n for t, n in zip(sampled_token_ids, step.num_draft_tokens)
        ]
        caps = self.drafter.plan_drafts(
            step.num_draft_tokens, accepted, seeds, max_drafts, mirror,
            steady=not scheduler_output.scheduled_new_reqs,
            committed=[len(t) for t in sampled_token_ids],
        )
        if not any(caps):
            return [[] for _ in sampled_token_ids]
        rows = self._verified_rows(step, sampled_token_ids, sampling_metadata)
        if getattr(self.drafter, "embed_tokens", False) is None:  # SJD2 embeds its drafts itself
            self.drafter.embed_tokens = self.get_model().embed_input_ids
        if predicted is not None:
            self._record_predictions(predicted, sampled_token_ids)
        num_tokens = self.input_batch.num_tokens_no_spec[:num_reqs].astype(np.int64)
        num_slots = self.drafter.num_slots
        entries = self._layout_entries(req_ids)
        # With every request an image, windows are built on its layout's ids only.
        vocab_size, device = step.vocab_size, rows.bonus_probs.device
        # (The sampling step's, where it sampled on them: the same batch's columns.)
        columns = rows.columns
        if columns is None:
            columns = self._layouts.columns(entries, vocab_size, device)
        # A fresh slot's q where no better row is known.
        allowed = self._layouts.slot_rows(entries, num_tokens, num_slots, vocab_size, device, columns,
                                          kind="uniform")
        above = (
            self._layouts.cells_above(entries, num_tokens, num_slots)
            if self.drafter.wants_cells_above
            else None
        )
        return self.drafter.propose_window(
            req_ids,
            rows,
            num_tokens=num_tokens,
            above=None if above is None else above[0],
            row_strides=() if above is None else above[1],
            seeds=seeds,
            greedy=self._greedy_mask(num_reqs),
            has_output=[len(t) > 0 for t in sampled_token_ids],
            allowed=allowed,
            mirror=mirror,
            max_drafts=caps,
            columns=columns,
            grids=entries,
            committed_tokens=self.input_batch.token_ids_cpu,
        )

    def _verified_rows(self, step: _StepLogits, sampled_token_ids, sampling_metadata):
        num_reqs = len(sampled_token_ids)
        device = step.bonus_logits.device if step.rows is None else step.rows.bonus_probs.device
        n_host = np.asarray(step.num_draft_tokens, dtype=np.int64)
        produced = np.array([len(t) for t in sampled_token_ids], dtype=np.int64)
        # a = produced - 1; a request that produced nothing keeps no rows.
        a_host = np.where(produced > 0, produced - 1, n_host)
        if step.rows is not None:  # (dataclasses.replace costs ~10 us a step)
            rows = step.rows
            if rows.requests is not None:  # rows of some requests only (no guided twins)
                n_host, a_host = n_host[rows.requests], a_host[rows.requests]
            n = torch.from_numpy(n_host).to(device)
            accepted = torch.from_numpy(a_host).to(device)
            return StepRows(rows.target_probs, rows.bonus_probs, n, accepted, rows.columns,
                            (n_host, a_host), rows.requests)
        n = torch.from_numpy(n_host).to(device)
        accepted = torch.from_numpy(a_host).to(device)
        cu_one_per_request = torch.arange(1, num_reqs + 1, device=device, dtype=torch.int32)
        bonus = rejection_sampler.apply_sampling_constraints(
            step.bonus_logits.to(torch.float32), cu_one_per_request, sampling_metadata
        )
        if step.target_logits is None or step.target_logits.shape[0] == 0:
            target_probs = bonus.new_zeros((0, bonus.shape[-1]))
        elif step.target_probs is not None:
            target_probs = step.target_probs  # the verifier's own softmax
        else:
            target_probs = step.target_logits.softmax(dim=-1, dtype=torch.float32)
        # Rows stay on the model's device; so do the windows built from them.
        return StepRows(
            target_probs=target_probs,
            bonus_probs=bonus.softmax(dim=-1, dtype=torch.float32),
            num_draft_tokens=n,
            num_accepted=accepted,
            host_counts=(n_host, a_host),
        )

    def _greedy_mask(self, num_reqs: int) -> np.ndarray:
        """[B] bool on the host: the temperature-0 requests (vLLM keeps 0.0 for them)."""
        temperature = self.input_batch.temperature_cpu[:num_reqs]
        return temperature == rejection_sampler.GREEDY_TEMPERATURE

    def measure_forward_costs(self, max_tokens: int, repeats: int = 3) -> list[tuple[int, float]]:
        """(tokens, seconds) of forward passes of 1, 2, 4, ... up to max_tokens tokens.

        The fastest of `repeats` timed passes after one warm-up pass; the same
        sizes on every rank (tensor-parallel passes run in lockstep).
        """
        sizes = [1 << i for i in range(max(max_tokens, 1).bit_length()) if 1 << i <= max_tokens]
        on_gpu = self.device.type == "cuda"
        points = []
        with torch.random.fork_rng(devices=[self.device] if on_gpu else []):
            for size in sizes:
                best = float("inf")
                for attempt in range(repeats + 1):
                    started = time.perf_counter()
                    self._dummy_run(size, skip_eplb=True)
                    if on_gpu:
                        torch.cuda.synchronize(self.device)
                    if attempt:  # the first pass warms up
                        best = min(best, time.perf_counter() - started)
                points.append((size, best))
        return points

    def _update_states(self, scheduler_output):
        result = super()._update_states(scheduler_output)
        gone = set(scheduler_output.finished_req_ids)
        preempted = set(scheduler_output.preempted_req_ids or ()) - gone
        if self._zipar is not None and preempted:
            # A ZipAR stream resumes as it was: only its pending drafts go.
            self._zipar.evict(preempted, finished=False)
            self._layouts.evict(preempted)
            preempted = set()
        gone |= preempted
        if gone:
            self._layouts.evict(gone)
            for req_id in gone:
                self._guidance_roles.pop(req_id, None)
            if self._proposer is not None:
                self._proposer.evict(gone)
        return result

    def sjd_tracked_requests(self) -> set[str]:
        """Request ids the runner or the proposer holds any state for."""
        tracked = self._layouts.tracked_requests() | set(self._guidance_roles)
        if self._proposer is not None:
            tracked |= self._proposer.tracked_requests()
        return tracked


class SJDGPUModelRunner(SJDModelRunnerMixin, GPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self._init_sjd()


class SJDCPUModelRunner(SJDModelRunnerMixin, CPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self._init_sjd()
