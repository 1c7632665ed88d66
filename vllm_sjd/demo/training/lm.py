"""Phase 4: the language model (model, losses, schedule, EMA, training loop)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from vllm_sjd.demo.training.clock import log
from vllm_sjd.demo.training.design import (
    NUM_CODES,
    VOCAB_SIZE,
    build_sequences,
    lm_config_kwargs,
    vocabulary,
)
from vllm_sjd.demo.training.lm_batches import (
    AUX_CLASSES,
    TrainingBatches,
    image_token_weights,
    make_batch,
)
from vllm_sjd.layouts import chameleon as cl

# --lm-lr-decay without --lm-decay-steps: the step rate is measured between
# these steps (after compilation) and the schedule ends at this share of the
# time left (evaluations take the rest).
RATE_FROM_STEP = 25
ESTIMATE_AT_STEP = 125
ESTIMATE_MARGIN = 0.95


def learning_rate(step: int, peak: float, warmup: int, decay_steps: int | None) -> float:
    """Linear warm-up to the peak, then constant, or linear to 0 at decay_steps."""
    lr = peak * min(1.0, (step + 1) / warmup)
    if decay_steps is not None and step >= warmup:
        lr *= max(0.0, (decay_steps - step) / max(1, decay_steps - warmup))
    return lr


def clock_decay_steps(step: int, rate_start: float, deadline: float) -> int:
    """The step the decay ends at: as many steps as ESTIMATE_MARGIN of the time
    left holds at the rate measured since RATE_FROM_STEP."""
    rate = (time.monotonic() - rate_start) / (step - RATE_FROM_STEP)
    return step + int(ESTIMATE_MARGIN * (deadline - time.monotonic()) / rate)


def new_language_model(args):
    """The Chameleon model (its VQ part frozen) and, with --lm-aux-weight, the
    probe: a training-time linear head, not part of the saved model."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    config = ChameleonConfig(**lm_config_kwargs(vocabulary(), args.lm_width))
    model = ChameleonForConditionalGeneration(config).float()
    for p in model.model.vqmodel.parameters():
        p.requires_grad_(False)
    aux_head = None
    if args.lm_aux_weight > 0:
        aux_head = torch.nn.Linear(args.lm_width, sum(AUX_CLASSES.values()))
    return model, aux_head


def lm_optimizer(args, model, aux_head):
    """The trained parameters and AdamW over them (no weight decay on norms and biases)."""
    params = [p for n, p in model.named_parameters() if "vqmodel" not in n]
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if "vqmodel" in n:
            continue
        (no_decay if p.dim() < 2 or "norm" in n else decay).append(p)
    if aux_head is not None:
        params += list(aux_head.parameters())
        decay.append(aux_head.weight)
        no_decay.append(aux_head.bias)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lm_lr, betas=(0.9, 0.95))
    return params, opt


def image_losses(model, aux_head, uniform: bool):
    """The batch losses: (per-position softmax over the image ids, weighted; the
    same unweighted, for the log; full-vocabulary softmax at the sampled
    positions; the probe's, 0 without labels)."""
    body, head = model.model, model.lm_head
    active = torch.tensor(list(range(cl.CODE_LOW, cl.CODE_LOW + NUM_CODES))
                          + [cl.END_OF_LINE, cl.IMAGE_END])
    to_active = torch.full((VOCAB_SIZE,), -100, dtype=torch.long)
    to_active[active] = torch.arange(active.numel())

    def losses(ids, targets, sample, weights, aux_labels=None):
        h = body(input_ids=ids).last_hidden_state[:, :-1]  # [B, T-1, H]
        act = F.linear(h, head.weight[active])  # [B, T-1, A]
        t_act = to_active[targets.clamp(min=0)].masked_fill(targets < 0, -100)
        act, t_act = act.reshape(-1, act.shape[-1]).float(), t_act.reshape(-1)
        if uniform:  # the plain mean, computed as it was before the option (same bits)
            ce_act = ce_plain = F.cross_entropy(act, t_act)
        else:
            # Weighted towards object cells: they carry what the caption says and
            # are a small share of the grid. The plain mean is logged.
            per_token = F.cross_entropy(act, t_act, reduction="none").view_as(weights)
            ce_act = (per_token * weights).sum() / weights.sum()
            ce_plain = per_token.sum() / (targets >= 0).sum()
        hs = torch.gather(h, 1, sample[..., None].expand(-1, -1, h.shape[-1]))
        full = head(hs).float()  # [B, S, V]
        ts = torch.gather(targets, 1, sample)
        ce_full = F.cross_entropy(full.reshape(-1, full.shape[-1]), ts.reshape(-1))
        ce_aux = torch.zeros((), device=h.device)
        if aux_labels is not None:
            parts = aux_head(h).float().split(list(AUX_CLASSES.values()), dim=-1)
            for k, part in enumerate(parts):  # a mean per class group, summed
                labels = aux_labels[:, k].reshape(-1)
                total = F.cross_entropy(part.reshape(-1, part.shape[-1]), labels, reduction="sum")
                ce_aux = ce_aux + total / (labels >= 0).sum().clamp(min=1)
        return ce_act, ce_plain, ce_full, ce_aux

    return losses


def compiled(losses, compile: bool):
    """torch.compile'd losses, bit-reproducible (see the package docstring); or as they are."""
    if not compile:
        return losses
    from torch._inductor import config as inductor_config

    inductor_config.force_disable_caches = True
    torch.use_deterministic_algorithms(True)
    return torch.compile(losses)


@torch.no_grad()
def validation_loss(model, seqs, length: int, gen: torch.Generator) -> float:
    """Full-vocabulary cross-entropy (nats/token) on the image part."""
    total, count = 0.0, 0
    for i in range(0, len(seqs), 32):
        ids, targets, _, _ = make_batch(seqs[i:i + 32], length, gen)
        h = model.model(input_ids=ids).last_hidden_state[:, :-1]
        logits = model.lm_head(h).float()
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1),
                               reduction="sum", ignore_index=-100)
        total += loss.item()
        count += int((targets >= 0).sum())
    return total / count


@torch.no_grad()
def load_weights(model, weights: dict[str, torch.Tensor]):
    for name, p in model.named_parameters():
        if name in weights:
            p.copy_(weights[name])


@contextmanager
def weights_swapped_in(model, weights: dict[str, torch.Tensor]):
    """The model with these weights inside the block, its own again after."""
    with torch.no_grad():
        saved = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
    load_weights(model, weights)
    yield
    load_weights(model, saved)


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], model, decay: float):
    for name, p in model.named_parameters():
        if name in ema:
            ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def record_losses(history: list, step: int, lr: float, losses, with_aux: bool, t0: float, clock):
    ce_act, ce_plain, ce_full, ce_aux = losses
    rate = (time.monotonic() - t0) / step
    history.append(dict(step=step, loss_active=round(ce_plain.item(), 4),
                        loss_active_weighted=round(ce_act.item(), 4),
                        loss_full_sampled=round(ce_full.item(), 4), lr=lr)
                   | ({"loss_aux": round(ce_aux.item(), 4)} if with_aux else {}))
    log(f"lm step {step} loss(active) {ce_plain.item():.4f} weighted {ce_act.item():.4f} "
        f"loss(full, sampled) {ce_full.item():.4f} "
        + (f"aux {ce_aux.item():.4f} " if with_aux else "") +
        f"({rate:.2f} s/step, {clock.elapsed() / 60:.1f} min)")


def train_lm(args, tokenizer, train_caps, train_codes, train_cells, val_caps, val_codes, clock,
             report, enc, train_aux=None):
    """Train, then load the EMA weights and the trained VQ encoder into the model.

    train_aux: the probe's labels (auxiliary_labels), None without the probe."""
    torch.manual_seed(args.seed + 7)
    gen = torch.Generator().manual_seed(args.seed + 7)
    model, aux_head = new_language_model(args)
    params, opt = lm_optimizer(args, model, aux_head)
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if "vqmodel" not in n}

    cond, uncond = build_sequences(tokenizer, train_caps, train_codes)
    vcond, vuncond = build_sequences(tokenizer, val_caps, val_codes)
    length = max(len(s) for s in cond + vcond)
    step_fn = compiled(image_losses(model, aux_head, uniform=args.lm_object_weight == 1.0),
                       args.compile)
    eval_gen = torch.Generator().manual_seed(args.seed + 11)
    batches = TrainingBatches(cond, uncond, image_token_weights(train_cells, args.lm_object_weight),
                              train_aux, args.lm_batch, length, gen)

    deadline = clock.deadline(args.lm_end_fraction)
    history = []
    t0 = time.monotonic()
    step = 0
    decay_steps = args.lm_decay_steps
    while (step < args.lm_steps and time.monotonic() < deadline
           and (decay_steps is None or step < decay_steps)):
        ids, targets, sample, weights, aux = batches.next()
        if step == RATE_FROM_STEP:
            rate_start = time.monotonic()
        if args.lm_lr_decay and decay_steps is None and step == ESTIMATE_AT_STEP:
            # The clock decides how many steps fit; from here on the schedule is
            # a number (the reproduce line pins it), not a time.
            decay_steps = clock_decay_steps(step, rate_start, deadline)
            log(f"lm: learning rate decays to 0 at step {decay_steps}")
        lr = learning_rate(step, args.lm_lr, args.lm_warmup, decay_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        losses = step_fn(ids, targets, sample, weights, aux)
        ce_act, _, ce_full, ce_aux = losses
        loss = ce_act + ce_full
        if aux_head is not None:
            loss = loss + args.lm_aux_weight * ce_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        update_ema(ema, model, min(args.lm_ema, (1 + step) / (10 + step)))
        if step % 25 == 0 or step == 1:
            record_losses(history, step, lr, losses, aux_head is not None, t0, clock)
        if step % args.lm_eval_every == 0:
            with weights_swapped_in(model, ema):
                v = validation_loss(model, vcond[:128], length, eval_gen)
            history.append(dict(step=step, val_cond_ema=round(v, 4)))
            log(f"lm step {step} val loss (EMA, conditional) {v:.4f}")
    train_s = time.monotonic() - t0
    log(f"lm: {step} steps in {train_s:.0f} s")
    load_weights(model, ema)
    model.eval()
    val_cond = validation_loss(model, vcond, length, eval_gen)
    val_uncond = validation_loss(model, vuncond, length, eval_gen)
    log(f"lm: val loss conditional {val_cond:.4f}, unconditional {val_uncond:.4f}")
    report["lm"] = dict(
        steps=step, decay_steps=decay_steps, width=args.lm_width, batch=args.lm_batch,
        aux_weight=args.lm_aux_weight,
        seconds=round(train_s), sequence_length=length,
        train_scenes=len(cond), sequences_seen=step * args.lm_batch,
        params_without_vq=sum(p.numel() for p in params), history=history,
        val_loss_conditional=round(val_cond, 4), val_loss_unconditional=round(val_uncond, 4),
        final_train_loss_active=history[-1].get("loss_active") if history else None,
    )
    # The trained encoder (and codebook, post_quant_conv) as model.vqmodel.*.
    with torch.no_grad():
        model.model.vqmodel.load_state_dict(enc.state_dict())
    return model
