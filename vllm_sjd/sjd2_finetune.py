"""SJD2's fine-tuning recipe for a Chameleon-family checkpoint: read noisy embeddings, predict clean tokens.

    .venv/bin/python scripts/finetune_sjd2.py --out /tmp/demo-sjd2          # the bundled demo model

The noise, its levels and the timestep input are vllm_sjd/core/denoising.py's.
Each training sequence is a captioned (or, 10% of the time, uncaptioned)
image; its image tokens' embeddings are perturbed from a random point on, in
consecutive segments of rising noise level, the level's learned vector is
added to every input, and the loss is the next clean token's cross-entropy
over the image ids (codes, end of line, end of image) at every position of
the clean prefix and the noisy run. Every weight of the language model is
tuned, with the timestep table (its level-0 row stays zero); the VQ model is
not. The output is the source checkpoint with new weights and an "sjd2"
entry in config.json; it loads in vLLM with the plugin like the source. Its
sjd2_report.json holds the loss on held-out scenes by the level of the input
before each target (0: the clean prefix), before and after the tuning.

Data: the demo's scene grammar (vllm_sjd/demo/scenes.py), rendered and
encoded with the checkpoint's own VQ encoder, so the recipe needs nothing but
the checkpoint. Other Chameleon checkpoints need their own image-token
sequences; not written yet.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_sjd.core.denoising import NoiseSettings, embedding_rms, noisy_embeddings, training_levels
from vllm_sjd.layouts import chameleon as cl


def parser() -> argparse.ArgumentParser:
    from vllm_sjd import demo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=demo.MODEL_PATH, help="checkpoint to fine-tune")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--noise-levels", type=int, default=16, help="L: levels 1..L, L pure noise")
    ap.add_argument("--max-segment", type=int, default=4, help="longest run of tokens at one level")
    ap.add_argument("--scenes", type=int, default=4000)
    ap.add_argument("--held-out", type=int, default=128, help="scenes for the loss by level")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--timestep-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-min", type=float, default=110.0, help="stop early at this wall time")
    return ap


def demo_sequences(source: Path, scenes: int, seed: int):
    """(captioned, uncaptioned) token sequences of the demo's scenes, encoded by `source`'s VQ."""
    from transformers import AutoTokenizer

    from vllm_sjd import demo
    from vllm_sjd.demo.scenes import sample_dataset
    from vllm_sjd.demo.training.design import build_sequences
    from vllm_sjd.demo.training.images import render_all
    from vllm_sjd.demo.training.vq import encode_all

    drawn = sample_dataset(seed, scenes)
    codes = encode_all(demo.load_encoder(source), render_all(drawn))
    tokenizer = AutoTokenizer.from_pretrained(source)
    return build_sequences(tokenizer, [s.caption for s in drawn], codes)


def image_ids(hf_config) -> torch.Tensor:
    """The ids an image position may hold: codes, end of line, end of image."""
    layout = hf_config.sjd_image_layout if hasattr(hf_config, "sjd_image_layout") else {}
    num_codes = (layout or {}).get("num_codes", cl.CODE_HIGH - cl.CODE_LOW)
    return torch.tensor(list(range(cl.CODE_LOW, cl.CODE_LOW + num_codes)) + [cl.END_OF_LINE, cl.IMAGE_END])


def batch_of(seqs, image_tokens: int, settings: NoiseSettings, max_segment: int, gen: torch.Generator):
    """ids [B, T] (right-padded), levels [B, T], targets [B, T-1] (-100 where no loss)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), 3, dtype=torch.long)
    levels = torch.zeros((len(seqs), length), dtype=torch.long)
    targets = torch.full((len(seqs), length - 1), -100, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        first = len(s) - image_tokens  # the image's first token
        span_levels, end = training_levels(image_tokens, gen, settings, max_segment)
        levels[r, first:len(s)] = span_levels
        # Hidden state p predicts token p + 1: from the header's last token
        # through the last noisy input.
        targets[r, first - 1:first + end] = ids[r, first:first + end + 1]
        targets[r, len(s) - 1:] = -100  # past the sequence's last token
    return ids, levels, targets


def token_losses(model, timestep, active, to_active, ids, levels, targets, noise, settings):
    """[B, T-1] next-clean-token cross-entropy over the image ids (0 where no target)."""
    body, head = model.model, model.lm_head
    clean = body.embed_tokens(ids)
    inputs = noisy_embeddings(clean, levels, noise, settings) + timestep(levels)
    hidden = body(inputs_embeds=inputs).last_hidden_state[:, :-1]
    logits = F.linear(hidden, head.weight[active]).float()
    target = to_active[targets.clamp(min=0)].masked_fill(targets < 0, -100)
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none")


@torch.no_grad()
def losses_by_level(model, timestep, active, to_active, batches, settings) -> dict:
    """Mean loss of the held-out batches by the level of the input before each target
    (0: the clean prefix), nats per token."""
    totals = torch.zeros(settings.noise_levels + 1, dtype=torch.float64)
    counts = torch.zeros_like(totals)
    for ids, levels, targets, noise in batches:
        per_token = token_losses(model, timestep, active, to_active, ids, levels, targets, noise, settings)
        valid = targets >= 0
        level = levels[:, :-1][valid]
        totals.index_add_(0, level, per_token[valid].double())
        counts.index_add_(0, level, torch.ones_like(level, dtype=torch.float64))
    return {str(t): round(float(totals[t] / counts[t]), 4) for t in range(len(totals)) if counts[t]}


def held_out_batches(args, image_tokens: int, settings: NoiseSettings, width: int):
    """Captioned sequences of other scenes (seed + 1), levels and noise fixed, in batches."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    cond, _ = demo_sequences(args.source, args.held_out, args.seed + 1)
    batches = []
    for i in range(0, len(cond), args.batch):
        ids, levels, targets = batch_of(cond[i:i + args.batch], image_tokens, settings, args.max_segment, gen)
        batches.append((ids, levels, targets, torch.randn((*ids.shape, width), generator=gen)))
    return batches


def finetune(args) -> dict:
    from transformers import AutoConfig, ChameleonForConditionalGeneration

    from vllm_sjd.demo.training.design import IMAGE_TOKENS, UNCOND_PROB

    started = time.monotonic()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    hf_config = AutoConfig.from_pretrained(args.source)
    model = ChameleonForConditionalGeneration.from_pretrained(args.source, dtype=torch.float32)
    body = model.model
    active = image_ids(hf_config)
    to_active = torch.full((hf_config.vocab_size,), -100, dtype=torch.long)
    to_active[active] = torch.arange(active.numel())
    with torch.no_grad():
        sigma = float(embedding_rms(body.embed_tokens.weight[active[:-2]]).mean())
    settings = NoiseSettings(args.noise_levels, sigma)
    timestep = torch.nn.Embedding(settings.noise_levels + 1, hf_config.hidden_size)
    torch.nn.init.zeros_(timestep.weight)
    body.sjd2_timestep_embedding = timestep  # saved as model.sjd2_timestep_embedding.weight

    cond, uncond = demo_sequences(args.source, args.scenes, args.seed)
    held_out = held_out_batches(args, IMAGE_TOKENS, settings, hf_config.hidden_size)
    before = losses_by_level(model, timestep, active, to_active, held_out, settings)
    print(json.dumps({"held_out_loss_by_level": before}), flush=True)
    tuned = [p for n, p in model.named_parameters() if "vqmodel" not in n and "sjd2" not in n]
    for p in body.vqmodel.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([{"params": tuned, "lr": args.lr, "weight_decay": 0.0},
                             {"params": timestep.parameters(), "lr": args.timestep_lr, "weight_decay": 0.0}],
                            betas=(0.9, 0.95))
    log, step = [], 0
    for step in range(args.steps):
        if time.monotonic() - started > args.budget_min * 60:
            break
        picks = torch.randint(len(cond), (args.batch,), generator=gen).tolist()
        drop = (torch.rand(args.batch, generator=gen) < UNCOND_PROB).tolist()
        seqs = [uncond[i] if d else cond[i] for i, d in zip(picks, drop)]
        ids, levels, targets = batch_of(seqs, IMAGE_TOKENS, settings, args.max_segment, gen)
        noise = torch.randn((*ids.shape, hf_config.hidden_size), generator=gen)
        per_token = token_losses(model, timestep, active, to_active, ids, levels, targets, noise, settings)
        loss = per_token.sum() / (targets >= 0).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned, 1.0)
        opt.step()
        with torch.no_grad():
            timestep.weight[0].zero_()  # clean tokens go in as the model's own
        if step % 20 == 0:
            log.append({"step": step, "loss": round(loss.item(), 4),
                        "s": round(time.monotonic() - started)})
            print(json.dumps(log[-1]), flush=True)
    after = losses_by_level(model, timestep, active, to_active, held_out, settings)
    print(json.dumps({"held_out_loss_by_level": after}), flush=True)
    report = {"command": "python scripts/finetune_sjd2.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "steps": step + 1, "wall_s": round(time.monotonic() - started),
              "settings": settings.as_config(), "log": log,
              "held_out_loss_by_level": {"before": before, "after": after}}
    save(model, hf_config, settings, args.source, args.out, report)
    return report


def save(model, hf_config, settings: NoiseSettings, source: Path, out: Path, report: dict) -> None:
    """The source checkpoint's files with the tuned weights, the sjd2 entry and the report."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text())
    config.update(settings.as_config())
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "sjd2_report.json").write_text(json.dumps(report, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None) -> None:
    finetune(parser().parse_args(argv))


if __name__ == "__main__":
    main()
