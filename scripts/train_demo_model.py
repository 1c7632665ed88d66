#!/usr/bin/env python
"""Train the bundled demo model: a VQ tokenizer and a Lumina-mGPT-format
Chameleon on procedurally drawn captioned scenes (vllm_sjd/demo/scenes.py).

One command, on CPU, time-budgeted:

    .venv/bin/python scripts/train_demo_model.py --seed 0

Phases (each stops at its step count or its share of the wall-clock budget,
whichever comes first; the counts actually run are written to the report):

1. Render the scenes (64x64 px; a held-out set from seed + 1).
2. VQ tokenizer, 4x downsampling, 512 codes of 8 dims: transformers'
   ChameleonVQVAE encoder (+ quant_conv) and our Chameleon VQGAN decoder
   (vllm_sjd/vq/chameleon_vqgan.py), both built small from one
   ChameleonVQVAEConfig. A plain autoencoder warm-up, a k-means initialised
   codebook, then EMA codebook updates with dead-code restarts; 32 px crops
   first (4x cheaper, the nets are fully convolutional), then full images.
   Loss: L1 + MSE weighted towards coloured pixels, plus an edge term (the
   images' finite differences), commitment 0.25.
3. Encode every scene to a 16x16 code grid.
4. The language model: ChameleonConfig (Lumina-mGPT's
   ChameleonXLLMXForConditionalGeneration), 6 layers. A sequence
   is the tokenized Lumina prompt "Generate an image of 64x64 according to
   the following prompt:\\n{caption}<reserved08706>", the image header
   (image start, height, width tokens), 16 rows of 16 codes each closed by
   end-of-line, end of image. 10% of sequences are unconditional (the header
   and the image only, for classifier-free guidance). Loss on the image part
   only (codes, end-of-line, end of image): a softmax over those ids at every
   position plus a full-vocabulary softmax at 32 sampled positions per
   sequence, which keeps every unused id improbable at a fraction of the
   cost. The image tokens of code cells that hold part of an object (any
   coloured pixel; about 13% of cells) weigh 4 times the others in the
   per-position softmax (--lm-object-weight): they carry what the caption
   says, and the shipped run with the weight matched captions better than
   the one without (benchmarks/RESULTS.md). A linear probe, used in training
   only and not saved, reads from every position that predicts a code the
   shape and colour of the object covering that cell (in sequences with a
   caption) and the cell's row and column (--lm-aux-weight 0.5 on its
   loss): without it the image positions never read the caption's shape
   word (benchmarks/caption_discrimination.py) and the shapes came out at
   chance; with it they follow the caption (benchmarks/RESULTS.md, "The
   auxiliary probe").
   Width 256 by default (--lm-width, heads of 64 channels, MLP 3x the
   width). Constant learning rate after warm-up, or a linear decay to 0 at
   the step the clock allows (--lm-lr-decay, estimated from the measured step
   rate) or at --lm-decay-steps; the saved weights are an
   exponential moving average, so a run cut short by the budget is the run
   with that step count.

5. Decoder polish: the VQ decoder alone on the frozen codes, its loss weighted
   towards coloured pixels (objects), so that hues survive decoding.

Outputs (vllm_sjd/demo/model/ by default): config.json, generation_config.json
(the served default temperature, 0.8), model.safetensors
(bf16, the encoder as model.vqmodel.*), tokenizer files,
vq/decoder.safetensors (fp32; vLLM loads every top-level *.safetensors),
train_report.json.

Same seed + same step counts (--vq-warmup-steps ... --lm-steps, with
--budget-min 0 to turn the clock off; the report's "reproduce" line) gives
the same checkpoint bytes on the same machine and thread count
(tests/test_demo_training.py). The language model's loss runs under
torch.compile with deterministic algorithms and no compile cache: without
them two runs differed in the last bits of 8 of 148 tensors after 3 steps,
the embeddings among them (likely source: inductor's accumulating index_put,
the embedding backward, which adds across threads in a varying order unless
deterministic algorithms are on); with them the runs were identical.
"""

from __future__ import annotations

import argparse
import json
import math
import os

# Other jobs share the two cores: spinning OpenMP threads then wait on each
# other (a 2-thread step measured 4x slower than 1 thread); passive waiting
# avoids that. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import shutil
import sys
import time
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO / "vllm_sjd" / "demo" / "model"  # where the package loads it from
# Sampling defaults for requests that name none (vLLM reads generation_config.json):
# at temperature 0.8 the pictures carry fewer stray blobs than at 1 and pass more
# whole captions (benchmarks/RESULTS.md, "Sampling settings").
DEMO_GENERATION_CONFIG = {"do_sample": True, "temperature": 0.8}
sys.path.insert(0, str(REPO))

from vllm_sjd.demo import scenes as sc  # noqa: E402
from vllm_sjd.demo.scorer import CHROMA_THRESHOLD  # noqa: E402
from vllm_sjd.models import chameleon_layout as cl  # noqa: E402

# ---- fixed design ---------------------------------------------------------
DOWNSAMPLE = 4
GRID = sc.IMAGE_SIZE // DOWNSAMPLE  # 16 codes per side
IMAGE_TOKENS = GRID * (GRID + 1) + 1  # codes, end-of-line per row, end of image
NUM_CODES = 512
EMBED_DIM = 8
VOCAB_SIZE = 8960
FIRST_WORD_ID = 8900
PROMPT_WORDS = ["Generate", "an", "image", "of", f"{sc.IMAGE_SIZE}x{sc.IMAGE_SIZE}", "according",
                "to", "the", "following", "prompt:"]
UNCOND_PROB = 0.1
FULL_SOFTMAX_POSITIONS = 32
DEFAULT_LM_WIDTH = 256  # the shipped model's; the reproduce line names any other
# --lm-lr-decay without --lm-decay-steps: the step rate is measured between
# these steps (after compilation) and the schedule ends at this share of the
# time left (evaluations take the rest).
RATE_FROM_STEP = 25
ESTIMATE_AT_STEP = 125
ESTIMATE_MARGIN = 0.95


def vq_config():
    from transformers import ChameleonVQVAEConfig

    return ChameleonVQVAEConfig(
        embed_dim=EMBED_DIM, num_embeddings=NUM_CODES, double_latent=False, latent_channels=32,
        resolution=sc.IMAGE_SIZE, in_channels=3, base_channels=32,
        channel_multiplier=[1, 2, 2], num_res_blocks=1, attn_resolutions=[],
        dropout=0.0, attn_type="vanilla",
    )


def lm_config_kwargs(vocab_map: dict[str, int], width: int) -> dict:
    # Heads of 64 channels at every width: the head size the shipped model is served with.
    heads = width // 64
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=6,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        rms_norm_eps=1e-5, vocabulary_map=vocab_map, tie_word_embeddings=False,
        vq_config=vq_config().to_dict(), bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )


# ---- vocabulary -------------------------------------------------------------

def image_token_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


SIZE_TOKEN_IDS = range(cl.SIZE_TOKEN_BASE, FIRST_WORD_ID)


def vocabulary() -> dict[str, int]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({image_token_name(c): cl.CODE_LOW + c for c in range(NUM_CODES)})
    vocab.update({"<eoss>": cl.IMAGE_END, "<racm3:break>": cl.IMAGE_START, "<image>": 8711,
                  "<reserved08799>": cl.END_OF_LINE, cl.TURN_SEPARATOR: cl.END_OF_TURN})
    vocab.update({f"<reserved{i - 4:05d}>": i for i in SIZE_TOKEN_IDS})
    words = list(dict.fromkeys(PROMPT_WORDS + sc.CAPTION_WORDS))
    vocab.update({w: FIRST_WORD_ID + i for i, w in enumerate(words)})
    assert max(vocab.values()) < VOCAB_SIZE
    return vocab


def save_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [cl.TURN_SEPARATOR, "<racm3:break>", "<eoss>", "<reserved08799>",
                *(f"<reserved{i - 4:05d}>" for i in SIZE_TOKEN_IDS)]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=specials,
    )
    fast.save_pretrained(path)
    return fast


def header_ids() -> list[int]:
    unit = 2 * DOWNSAMPLE
    return [cl.IMAGE_START, cl.SIZE_TOKEN_BASE + sc.IMAGE_SIZE // unit,
            cl.SIZE_TOKEN_BASE + sc.IMAGE_SIZE // unit]


def prompt_text_ids(tokenizer, caption: str) -> list[int]:
    """The templated text prompt (without the image header)."""
    text = cl.PROMPT_TEMPLATE.format(width=sc.IMAGE_SIZE, height=sc.IMAGE_SIZE, prompt=caption)
    ids = tokenizer(text)["input_ids"]
    assert 0 not in ids, f"unknown word in {text!r}"
    return ids


def in_image_token_order(cell_values: np.ndarray, end_of_line, end_of_image) -> np.ndarray:
    """[..., GRID, GRID] per-cell values -> [..., GRID * (GRID + 1) + 1] in the
    image-token order: each row closed by end_of_line, then end_of_image."""
    lead = cell_values.shape[:-2]
    eol = np.full(lead + (GRID, 1), end_of_line, cell_values.dtype)
    rows = np.concatenate([cell_values, eol], axis=-1).reshape(lead + (-1,))
    return np.concatenate([rows, np.full(lead + (1,), end_of_image, rows.dtype)], axis=-1)


def image_ids(codes: np.ndarray) -> list[int]:
    """[16, 16] codes -> rows of ids each closed by end-of-line, then end of image."""
    return in_image_token_order(codes.astype(np.int64) + cl.CODE_LOW, cl.END_OF_LINE,
                                cl.IMAGE_END).tolist()


# ---- helpers ------------------------------------------------------------------

class Clock:
    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def deadline(self, fraction_end: float) -> float:
        """Absolute monotonic time at which a phase ending at this fraction stops."""
        return math.inf if self.budget_s <= 0 else self.start + fraction_end * self.budget_s


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _render_chunk(scenes):
    return np.stack([sc.render(s) for s in scenes])


def render_all(scenes, workers: int = 2) -> np.ndarray:
    chunks = [scenes[i:i + 256] for i in range(0, len(scenes), 256)]
    with get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, chunks)
    return np.concatenate(parts)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], on the uint8 scale."""
    a8 = ((a.clamp(-1, 1) + 1) * 127.5).round()
    b8 = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((a8 - b8) ** 2).mean().item()
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


# ---- VQ -------------------------------------------------------------------------

class EMACodebook:
    def __init__(self, num: int, dim: int, decay: float = 0.95):
        self.decay = decay
        self.embed = torch.zeros(num, dim)
        self.count = torch.ones(num)
        self.sum = torch.zeros(num, dim)

    def init_kmeans(self, z: torch.Tensor, gen: torch.Generator, iters: int = 20):
        k = self.embed.shape[0]
        centres = z[torch.randperm(z.shape[0], generator=gen)[:k]].clone()
        for _ in range(iters):
            idx = self.assign(z, centres)
            counts = torch.bincount(idx, minlength=k).float()
            sums = torch.zeros_like(centres).index_add_(0, idx, z)
            empty = counts == 0
            centres = torch.where(empty[:, None], centres, sums / counts.clamp(min=1)[:, None])
            if empty.any():  # re-seed empty clusters with random points
                centres[empty] = z[torch.randint(z.shape[0], (int(empty.sum()),), generator=gen)]
        self.embed = centres
        self.count = torch.ones(k)
        self.sum = centres.clone()

    @staticmethod
    def assign(z: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        d = (z * z).sum(1, keepdim=True) - 2 * z @ embed.T + (embed * embed).sum(1)
        return d.argmin(1)

    def quantize(self, z: torch.Tensor, update: bool, gen: torch.Generator | None = None):
        """z [B, D, h, w] -> (straight-through zq, commitment loss, indices [B, h, w])."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        idx = self.assign(flat.detach(), self.embed)
        zq = self.embed[idx]
        commit = F.mse_loss(flat, zq)
        if update:
            with torch.no_grad():
                counts = torch.bincount(idx, minlength=self.embed.shape[0]).float()
                sums = torch.zeros_like(self.embed).index_add_(0, idx, flat.detach())
                self.count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
                self.sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
                n = self.count.sum()
                smoothed = (self.count + 1e-5) / (n + self.embed.shape[0] * 1e-5) * n
                self.embed = self.sum / smoothed[:, None]
                dead = self.count < 0.02  # unused for about 80 steps
                if gen is not None and dead.any():
                    pick = torch.randint(flat.shape[0], (int(dead.sum()),), generator=gen)
                    self.embed[dead] = flat.detach()[pick]
                    self.sum[dead] = self.embed[dead]
                    self.count[dead] = 1.0
        zq = flat + (zq - flat).detach()
        return zq.view(b, h, w, d).permute(0, 3, 1, 2), commit, idx.view(b, h, w)


def chroma_weighted_loss(y: torch.Tensor, x: torch.Tensor, chroma_weight: float) -> torch.Tensor:
    """L1 + MSE per pixel, weighted by 1 + chroma_weight * the target's chroma."""
    weight = 1 + chroma_weight * (x.max(1, keepdim=True).values - x.min(1, keepdim=True).values)
    return (weight * ((y - x).abs() + (y - x) ** 2)).mean()


def reconstruction_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + MSE weighted towards coloured pixels, plus an edge term.

    Objects are a small share of the pixels: an unweighted loss spends the
    codebook on backgrounds and decodes shapes as soft blobs. Weighting by
    chroma and matching the images' finite differences keeps object outlines."""
    pixel = chroma_weighted_loss(y, x, 4)
    edges = (torch.diff(y, dim=-1) - torch.diff(x, dim=-1)).abs().mean() + \
        (torch.diff(y, dim=-2) - torch.diff(x, dim=-2)).abs().mean()
    return pixel + edges


def train_vq(args, images: np.ndarray, val_images: np.ndarray, clock: Clock, report: dict):
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    from vllm_sjd.vq.chameleon_vqgan import ChameleonVQGANDecoder

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = vq_config()
    enc = ChameleonVQVAE(cfg).train()  # encoder + quant_conv (+ unused codebook copy)
    dec = ChameleonVQGANDecoder(cfg).train()
    params = list(enc.encoder.parameters()) + list(enc.quant_conv.parameters()) + \
        list(dec.post_quant_conv.parameters()) + list(dec.decoder.parameters())
    opt = torch.optim.Adam(params, lr=args.vq_lr, betas=(0.9, 0.99))
    book = EMACodebook(NUM_CODES, EMBED_DIM)
    n = images.shape[0]
    val = to_tensor(val_images[:64])

    def batch(size: int, crop: int) -> torch.Tensor:
        idx = torch.randint(n, (size,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        if crop < sc.IMAGE_SIZE:
            # Crops aligned to the code grid, like the full image's tokens.
            top = torch.randint(0, (sc.IMAGE_SIZE - crop) // DOWNSAMPLE + 1, (2,), generator=gen)
            y0, x0 = int(top[0]) * DOWNSAMPLE, int(top[1]) * DOWNSAMPLE
            x = x[:, :, y0:y0 + crop, x0:x0 + crop]
        return x

    def encode(x):
        return enc.quant_conv(enc.encoder(x))

    def decode(zq):
        return dec.decoder(dec.post_quant_conv(zq))

    history = []
    phases = [
        ("warmup", args.vq_warmup_steps, args.vq_crop, False, 0.07),
        ("crops", args.vq_crop_steps, args.vq_crop, True, 0.21),
        ("full", args.vq_full_steps, sc.IMAGE_SIZE, True, 0.28),
    ]
    steps_run = {}
    for name, max_steps, crop, quantize, end_fraction in phases:
        deadline = clock.deadline(end_fraction)
        if quantize and name == "crops":
            with torch.no_grad():
                enc.eval()
                z = torch.cat([encode(to_tensor(images[i:i + 32])) for i in range(0, 256, 32)])
                enc.train()
            flat = z.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
            flat = flat[torch.randperm(flat.shape[0], generator=gen)[:16384]]
            book.init_kmeans(flat, gen)
            log(f"vq: k-means codebook from {flat.shape[0]} vectors")
        if name == "full":
            for group in opt.param_groups:
                group["lr"] = args.vq_lr * 0.5
        bs = args.vq_batch
        t0 = time.monotonic()
        step = 0
        while step < max_steps and time.monotonic() < deadline:
            x = batch(bs, crop)
            z = encode(x)
            if quantize:
                zq, commit, idx = book.quantize(z, update=True, gen=gen if step % 20 == 0 else None)
            else:
                zq, commit = z, torch.zeros(())
            y = decode(zq)
            rec = reconstruction_loss(y, x)
            loss = rec + 0.25 * commit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % 25 == 0 or step == 1:
                used = int(torch.unique(idx).numel()) if quantize else 0
                history.append(dict(phase=name, step=step, rec=round(rec.item(), 4),
                                    commit=round(commit.item(), 5), codes_in_batch=used))
                log(f"vq {name} step {step} rec {rec.item():.4f} commit {commit.item():.5f} "
                    f"codes/batch {used} ({(time.monotonic() - t0) / step:.2f} s/step)")
        steps_run[name] = step
        log(f"vq {name}: {step} steps in {time.monotonic() - t0:.0f} s")

    enc.eval()
    dec.eval()
    with torch.no_grad():
        z = encode(val)
        zq, _, idx = book.quantize(z, update=False)
        recon = decode(zq)
        val_psnr = psnr(recon, val)
        ae_psnr = psnr(decode(z), val)
    # Codebook into both halves; post_quant_conv into the encoder's copy too.
    with torch.no_grad():
        enc.quantize.embedding.weight.copy_(book.embed)
        dec.quantize.embedding.weight.copy_(book.embed)
        enc.post_quant_conv.load_state_dict(dec.post_quant_conv.state_dict())
    counts = torch.bincount(idx.flatten(), minlength=NUM_CODES).float()
    p = counts / counts.sum()
    report["vq"] = dict(
        config=cfg.to_dict(), steps=steps_run, history=history, val_psnr_db=round(val_psnr, 2),
        val_psnr_unquantized_db=round(ae_psnr, 2),
        val_codes_used=int((counts > 0).sum()),
        val_code_perplexity=round(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())), 1),
        encoder_params=sum(x.numel() for x in enc.encoder.parameters()),
        decoder_params=sum(x.numel() for x in dec.parameters()),
    )
    log(f"vq: val PSNR {val_psnr:.2f} dB (unquantised {ae_psnr:.2f}), "
        f"{report['vq']['val_codes_used']} codes used, perplexity {report['vq']['val_code_perplexity']}")
    return enc, dec


@torch.no_grad()
def encode_all(enc, images: np.ndarray, batch: int = 64) -> np.ndarray:
    out = []
    book = enc.quantize.embedding.weight
    for i in range(0, images.shape[0], batch):
        z = enc.quant_conv(enc.encoder(to_tensor(images[i:i + batch])))
        flat = z.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        out.append(EMACodebook.assign(flat, book).view(z.shape[0], GRID, GRID).numpy())
    return np.concatenate(out).astype(np.int16)


# ---- language model -------------------------------------------------------------

def build_sequences(tokenizer, captions, codes):
    header = header_ids()
    prompts = {}
    cond, uncond = [], []
    for caption, grid in zip(captions, codes):
        if caption not in prompts:
            prompts[caption] = prompt_text_ids(tokenizer, caption)
        body = header + image_ids(grid)
        cond.append(prompts[caption] + body)
        uncond.append(body)
    return cond, uncond


def object_cells(images: np.ndarray) -> np.ndarray:
    """[N, GRID, GRID] bool: the code cells holding any object pixel, by the
    scorer's test (chroma at least CHROMA_THRESHOLD; backgrounds are achromatic)."""
    rgb = images.astype(np.float32) / 255.0
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)  # [N, H, W]
    n = images.shape[0]
    cells = chroma.reshape(n, GRID, DOWNSAMPLE, GRID, DOWNSAMPLE).max(axis=(2, 4))
    return cells >= CHROMA_THRESHOLD


def image_token_weights(cells: np.ndarray, object_weight: float) -> np.ndarray:
    """[N, GRID * (GRID + 1) + 1] loss weights in image-token order: object_weight
    on object cells, 1 elsewhere (end-of-line and end of image included)."""
    return in_image_token_order(np.where(cells, object_weight, 1.0).astype(np.float32), 1.0, 1.0)


# --lm-aux-weight: classes of the auxiliary probe, read at every position that
# predicts a code, for the cell it predicts. Shape and colour of the object
# that covers the cell teach the image positions to read the caption's words
# for that object; row and column teach them where in the 2-D grid they are
# (the model sees a 1-D stream with end-of-line tokens).
AUX_CLASSES = {"shape": len(sc.SHAPES), "colour": len(sc.COLOURS), "row": GRID, "column": GRID}
AUX_FROM_CAPTION = [list(AUX_CLASSES).index(k) for k in ("shape", "colour")]
AUX_MIN_COVER = 0.1  # share of a cell an object must cover to name its shape and colour


def auxiliary_labels(scenes) -> np.ndarray:
    """[N, len(AUX_CLASSES), image tokens] class ids in image-token order; -100
    where there is none (end-of-line, end of image; shape and colour of cells no
    object covers)."""
    rows, columns = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    colours = list(sc.COLOURS)
    labels = []
    for scene in scenes:
        cover = sc.object_coverage(scene, GRID)  # [objects, GRID, GRID]
        owner, covered = cover.argmax(0), cover.max(0) >= AUX_MIN_COVER
        shape = np.array([sc.SHAPES.index(o.shape) for o in scene.objects])[owner]
        colour = np.array([colours.index(o.colour) for o in scene.objects])[owner]
        cells = np.stack([np.where(covered, shape, -100), np.where(covered, colour, -100),
                          rows, columns])
        labels.append(in_image_token_order(cells, -100, -100))
    return np.stack(labels).astype(np.int64)


def image_targets(seq) -> slice:
    """Where a sequence's image tokens sit among the targets [T-1] (shifted by one)."""
    return slice(len(seq) - IMAGE_TOKENS - 1, len(seq) - 1)


def auxiliary_batch(seqs, length: int, labels: np.ndarray) -> torch.Tensor:
    """[B, len(AUX_CLASSES), T-1] labels aligned with make_batch's targets."""
    aux = torch.full((len(seqs), labels.shape[1], length - 1), -100, dtype=torch.long)
    for r, s in enumerate(seqs):
        aux[r, :, image_targets(s)] = torch.from_numpy(labels[r])
    return aux


def make_batch(seqs, length: int, gen: torch.Generator, image_weights=None):
    """Right-padded ids [B, T], targets [B, T-1] (-100 outside the image part),
    FULL_SOFTMAX_POSITIONS sampled target positions per row, and per-target loss
    weights [B, T-1] (0 outside the image part; `image_weights[r]` or 1 inside)."""
    b = len(seqs)
    ids = torch.full((b, length), 3, dtype=torch.long)
    targets = torch.full((b, length - 1), -100, dtype=torch.long)
    weights = torch.zeros((b, length - 1), dtype=torch.float32)
    sample = torch.empty((b, FULL_SOFTMAX_POSITIONS), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        span = image_targets(s)
        targets[r, span] = ids[r, span.start + 1:span.stop + 1]
        weights[r, span] = 1.0 if image_weights is None else torch.from_numpy(image_weights[r])
        sample[r] = span.start + torch.randint(IMAGE_TOKENS, (FULL_SOFTMAX_POSITIONS,), generator=gen)
    return ids, targets, sample, weights


def learning_rate(step: int, peak: float, warmup: int, decay_steps: int | None) -> float:
    """Linear warm-up to the peak, then constant, or linear to 0 at decay_steps."""
    lr = peak * min(1.0, (step + 1) / warmup)
    if decay_steps is not None and step >= warmup:
        lr *= max(0.0, (decay_steps - step) / max(1, decay_steps - warmup))
    return lr


def train_lm(args, tokenizer, train_caps, train_codes, train_cells, val_caps, val_codes, clock,
             report, enc, train_aux=None):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(args.seed + 7)
    gen = torch.Generator().manual_seed(args.seed + 7)
    config = ChameleonConfig(**lm_config_kwargs(vocabulary(), args.lm_width))
    model = ChameleonForConditionalGeneration(config).float()
    body, head = model.model, model.lm_head
    for p in body.vqmodel.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "vqmodel" not in n]
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if "vqmodel" in n:
            continue
        (no_decay if p.dim() < 2 or "norm" in n else decay).append(p)
    aux_head = None
    if args.lm_aux_weight > 0:  # a training-time probe; not part of the saved model
        aux_head = torch.nn.Linear(args.lm_width, sum(AUX_CLASSES.values()))
        params += list(aux_head.parameters())
        decay.append(aux_head.weight)
        no_decay.append(aux_head.bias)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lm_lr, betas=(0.9, 0.95))
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if "vqmodel" not in n}

    cond, uncond = build_sequences(tokenizer, train_caps, train_codes)
    vcond, vuncond = build_sequences(tokenizer, val_caps, val_codes)
    length = max(len(s) for s in cond + vcond)
    active = torch.tensor(list(range(cl.CODE_LOW, cl.CODE_LOW + NUM_CODES))
                          + [cl.END_OF_LINE, cl.IMAGE_END])
    to_active = torch.full((VOCAB_SIZE,), -100, dtype=torch.long)
    to_active[active] = torch.arange(active.numel())

    weights_by_scene = image_token_weights(train_cells, args.lm_object_weight)
    uniform = args.lm_object_weight == 1.0

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

    if args.compile:
        # Bit-reproducible compiled training (see the module docstring).
        from torch._inductor import config as inductor_config

        inductor_config.force_disable_caches = True
        torch.use_deterministic_algorithms(True)
    step_fn = torch.compile(losses) if args.compile else losses

    eval_gen = torch.Generator().manual_seed(args.seed + 11)

    @torch.no_grad()
    def evaluate(seqs, weights=None):
        """Full-vocabulary cross-entropy (nats/token) on the image part."""
        if weights is not None:
            saved = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
            for n, p in model.named_parameters():
                if n in weights:
                    p.copy_(weights[n])
        total, count = 0.0, 0
        for i in range(0, len(seqs), 32):
            ids, targets, _, _ = make_batch(seqs[i:i + 32], length, eval_gen)
            h = body(input_ids=ids).last_hidden_state[:, :-1]
            logits = head(h).float()
            loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1),
                                   reduction="sum", ignore_index=-100)
            total += loss.item()
            count += int((targets >= 0).sum())
        if weights is not None:
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        return total / count

    deadline = clock.deadline(args.lm_end_fraction)
    n = len(cond)
    history = []
    t0 = time.monotonic()
    step = 0
    order = torch.randperm(n, generator=gen)
    cursor = 0
    decay_steps = args.lm_decay_steps
    while (step < args.lm_steps and time.monotonic() < deadline
           and (decay_steps is None or step < decay_steps)):
        if cursor + args.lm_batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        picks = order[cursor:cursor + args.lm_batch].tolist()
        cursor += args.lm_batch
        drop = torch.rand(len(picks), generator=gen) < UNCOND_PROB
        seqs = [uncond[i] if d else cond[i] for i, d in zip(picks, drop.tolist())]
        ids, targets, sample, weights = make_batch(seqs, length, gen, weights_by_scene[picks])
        aux = None
        if aux_head is not None:
            labels = train_aux[picks].copy()
            labels[np.ix_(drop.numpy(), AUX_FROM_CAPTION)] = -100  # no caption to read them from
            aux = auxiliary_batch(seqs, length, labels)
        if step == RATE_FROM_STEP:
            t_rate = time.monotonic()
        if args.lm_lr_decay and decay_steps is None and step == ESTIMATE_AT_STEP:
            # The clock decides how many steps fit; from here on the schedule is
            # a number (the reproduce line pins it), not a time.
            rate = (time.monotonic() - t_rate) / (step - RATE_FROM_STEP)
            decay_steps = step + int(ESTIMATE_MARGIN * (deadline - time.monotonic()) / rate)
            log(f"lm: learning rate decays to 0 at step {decay_steps}")
        lr = learning_rate(step, args.lm_lr, args.lm_warmup, decay_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        ce_act, ce_plain, ce_full, ce_aux = step_fn(ids, targets, sample, weights, aux)
        loss = ce_act + ce_full
        if aux_head is not None:
            loss = loss + args.lm_aux_weight * ce_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        d = min(args.lm_ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in ema:
                    ema[name].mul_(d).add_(p.detach(), alpha=1 - d)
        if step % 25 == 0 or step == 1:
            rate = (time.monotonic() - t0) / step
            history.append(dict(step=step, loss_active=round(ce_plain.item(), 4),
                                loss_active_weighted=round(ce_act.item(), 4),
                                loss_full_sampled=round(ce_full.item(), 4), lr=lr)
                           | ({"loss_aux": round(ce_aux.item(), 4)} if aux_head is not None else {}))
            log(f"lm step {step} loss(active) {ce_plain.item():.4f} weighted {ce_act.item():.4f} "
                f"loss(full, sampled) {ce_full.item():.4f} "
                + (f"aux {ce_aux.item():.4f} " if aux_head is not None else "") +
                f"({rate:.2f} s/step, {clock.elapsed() / 60:.1f} min)")
        if step % args.lm_eval_every == 0:
            v = evaluate(vcond[:128], ema)
            history.append(dict(step=step, val_cond_ema=round(v, 4)))
            log(f"lm step {step} val loss (EMA, conditional) {v:.4f}")
    train_s = time.monotonic() - t0
    log(f"lm: {step} steps in {train_s:.0f} s")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ema:
                p.copy_(ema[name])
    model.eval()
    val_cond = evaluate(vcond)
    val_uncond = evaluate(vuncond)
    log(f"lm: val loss conditional {val_cond:.4f}, unconditional {val_uncond:.4f}")
    report["lm"] = dict(
        steps=step, decay_steps=decay_steps, width=args.lm_width, batch=args.lm_batch,
        aux_weight=args.lm_aux_weight,
        seconds=round(train_s), sequence_length=length,
        train_scenes=n, sequences_seen=step * args.lm_batch,
        params_without_vq=sum(p.numel() for p in params), history=history,
        val_loss_conditional=round(val_cond, 4), val_loss_unconditional=round(val_uncond, 4),
        final_train_loss_active=history[-1].get("loss_active") if history else None,
    )
    # The trained encoder (and codebook, post_quant_conv) as model.vqmodel.*.
    with torch.no_grad():
        body.vqmodel.load_state_dict(enc.state_dict())
    return model


def polish_decoder(args, enc, dec, images: np.ndarray, codes: np.ndarray, val_images: np.ndarray,
                   report: dict):
    """Phase 5: the decoder alone (and its copy of the codebook) on frozen codes.

    The shapes are a small share of the pixels, so the plain reconstruction
    loss is ruled by the backgrounds and object hues drift (red decodes as
    orange). Here each pixel's loss is weighted by 1 + 8 * its chroma. The
    encoder, its codebook and so the language model's codes do not change."""
    torch.manual_seed(args.seed + 13)
    gen = torch.Generator().manual_seed(args.seed + 13)
    codes = torch.from_numpy(codes.astype(np.int64))
    val = to_tensor(val_images[:64])
    with torch.no_grad():
        val_codes = torch.from_numpy(encode_all(enc, val_images[:64]).astype(np.int64))
        before = psnr(dec.decode(val_codes), val)
    dec.train()
    opt = torch.optim.Adam(dec.parameters(), lr=5e-4)
    t0 = time.monotonic()
    for step in range(1, args.polish_steps + 1):
        idx = torch.randint(len(codes), (args.vq_batch,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        y = dec.decoder(dec.post_quant_conv(dec.embed(codes[idx])))
        loss = chroma_weighted_loss(y, x, 8)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"decoder polish step {step} weighted loss {loss.item():.4f} "
                f"({(time.monotonic() - t0) / step:.2f} s/step)")
    dec.eval()
    with torch.no_grad():
        after = psnr(dec.decode(val_codes), val)
    report["decoder_polish"] = dict(steps=args.polish_steps, seconds=round(time.monotonic() - t0),
                                    val_psnr_before_db=round(before, 2), val_psnr_after_db=round(after, 2))
    log(f"decoder polish: val PSNR {before:.2f} -> {after:.2f} dB")


def training_scenes(args, seed: int, count: int) -> list[sc.Scene]:
    """The scene grammar's scenes; with `--object-fills flat` every object is
    drawn in one flat shade, so fewer codes stand for each colour and shape."""
    scenes = sc.sample_dataset(seed, count)
    if args.object_fills == "varied":
        return scenes
    return [replace(s, objects=tuple(replace(o, fill="flat") for o in s.objects)) for s in scenes]


def scene_flags(args) -> str:
    """The reproduce line's flags for the training scenes (none for the grammar's own)."""
    return "" if args.object_fills == "varied" else f" --object-fills {args.object_fills}"


def lm_flags(args, lm_report: dict) -> str:
    """The language model's shape and schedule flags for the reproduce line ('' for defaults)."""
    flags = f" --lm-width {args.lm_width}" if args.lm_width != DEFAULT_LM_WIDTH else ""
    if lm_report["decay_steps"] is not None:
        flags += f" --lm-decay-steps {lm_report['decay_steps']}"
    if args.lm_aux_weight:
        flags += f" --lm-aux-weight {args.lm_aux_weight:g}"
    return flags


def polish_checkpoint(args) -> None:
    """Run phase 5 on a saved checkpoint (the same function a full run ends with)."""
    from safetensors.torch import save_file

    from vllm_sjd import demo

    path = args.polish_from
    report = json.loads((path / "train_report.json").read_text())
    enc, dec = demo.load_encoder(path), demo.load_decoder(path)
    images = render_all(training_scenes(args, args.seed, args.scenes))
    val_images = render_all(training_scenes(args, args.seed + 1, args.val_scenes))
    polish_decoder(args, enc, dec, images, encode_all(enc, images), val_images, report)
    save_file({k: v.contiguous() for k, v in dec.state_dict().items()},
              str(path / "vq" / "decoder.safetensors"))
    # A second polish is a second command: appending its flag to the first would
    # name one polish (argparse keeps the last --polish-steps), not both.
    report["reproduce"] += (
        f" && python scripts/train_demo_model.py --seed {args.seed} --scenes {args.scenes} "
        f"--val-scenes {args.val_scenes} --polish-from {DEMO_MODEL_DIR.relative_to(REPO)} "
        f"--polish-steps {args.polish_steps}" + scene_flags(args))
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    (path / "train_report.json").write_text(json.dumps(report, indent=2))


def save_model(model, dec, tokenizer_dir: Path, out: Path):
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    config_file = tmp / "config.json"
    saved = json.loads(config_file.read_text())
    saved["architectures"] = ["ChameleonXLLMXForConditionalGeneration"]
    saved["z_loss_weight"] = 0.0
    saved["torch_dtype"] = "bfloat16"
    saved["sjd_image_layout"] = {"target_size": sc.IMAGE_SIZE, "downsample": DOWNSAMPLE,
                                 "num_codes": NUM_CODES}
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True))
    (tmp / "generation_config.json").write_text(
        json.dumps(DEMO_GENERATION_CONFIG, indent=2, sort_keys=True) + "\n")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp / f.name)
    # In a subfolder: vLLM loads every *.safetensors at the top level.
    (tmp / "vq").mkdir()
    save_file({k: v.contiguous() for k, v in dec.state_dict().items()},
              str(tmp / "vq" / "decoder.safetensors"))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEMO_MODEL_DIR)
    ap.add_argument("--budget-min", type=float, default=68.0,
                    help="wall-clock budget for everything; 0 = no clock, step counts only")
    ap.add_argument("--scenes", type=int, default=8000)
    ap.add_argument("--val-scenes", type=int, default=256)
    ap.add_argument("--vq-warmup-steps", type=int, default=150)
    ap.add_argument("--vq-crop-steps", type=int, default=2000)
    ap.add_argument("--vq-full-steps", type=int, default=400)
    ap.add_argument("--vq-crop", type=int, default=32)
    ap.add_argument("--vq-batch", type=int, default=16)
    ap.add_argument("--vq-lr", type=float, default=1e-3)
    ap.add_argument("--lm-steps", type=int, default=4000)
    ap.add_argument("--lm-batch", type=int, default=16)
    ap.add_argument("--lm-lr", type=float, default=1.5e-3)
    ap.add_argument("--lm-warmup", type=int, default=100)
    ap.add_argument("--lm-ema", type=float, default=0.995)
    ap.add_argument("--lm-width", type=int, default=DEFAULT_LM_WIDTH,
                    help="the language model's hidden size (a multiple of 64; 6 layers, MLP 3x)")
    ap.add_argument("--lm-lr-decay", action="store_true",
                    help="after warm-up, decay the learning rate linearly to 0 at the step "
                         "the clock allows (estimated from the step rate; default: constant)")
    ap.add_argument("--lm-decay-steps", type=int, default=None,
                    help="decay linearly to 0 at this step instead (the reproduce line's form)")
    ap.add_argument("--lm-object-weight", type=float, default=4.0,
                    help="loss weight of image tokens in cells holding an object (1 = uniform)")
    ap.add_argument("--lm-aux-weight", type=float, default=0.5,
                    help="weight of the auxiliary probe loss (shape, colour, row, column of the "
                         "cell each position predicts); 0 turns it off")
    ap.add_argument("--object-fills", choices=("varied", "flat"), default="varied",
                    help="objects' shading in the training scenes: the grammar's random "
                         "fills (flat, gradient, radial) or flat only")
    ap.add_argument("--lm-eval-every", type=int, default=250)
    ap.add_argument("--lm-end-fraction", type=float, default=0.96,
                    help="the LM phase stops at this fraction of the budget (the rest saves)")
    ap.add_argument("--polish-steps", type=int, default=300,
                    help="decoder-only steps on frozen codes, after the language model")
    ap.add_argument("--polish-from", type=Path, default=None,
                    help="only run the decoder polish on this saved checkpoint, in place")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the language model's loss (deterministic kernels, "
                         "compiled cold every run); --no-compile runs it eagerly")
    ap.add_argument("--stop-after-vq", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.lm_width % 64:
        ap.error(f"--lm-width {args.lm_width} is not a multiple of 64")
    if args.lm_lr_decay and args.lm_decay_steps is None and args.budget_min <= 0:
        ap.error("--lm-lr-decay without a clock (--budget-min 0) needs --lm-decay-steps")

    torch.set_num_threads(2)
    if args.polish_from:
        polish_checkpoint(args)
        return
    clock = Clock(args.budget_min * 60)
    report: dict = {"command": "python scripts/train_demo_model.py " + " ".join(sys.argv[1:]),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "torch": torch.__version__, "threads": torch.get_num_threads()}
    log(f"rendering {args.scenes} + {args.val_scenes} scenes")
    train_scenes = training_scenes(args, args.seed, args.scenes)
    val_scenes = training_scenes(args, args.seed + 1, args.val_scenes)
    images = render_all(train_scenes)
    val_images = render_all(val_scenes)
    report["render_s"] = round(clock.elapsed())
    log(f"rendered in {clock.elapsed():.0f} s")

    enc, dec = train_vq(args, images, val_images, clock, report)
    report["vq_done_s"] = round(clock.elapsed())
    if args.stop_after_vq:  # development: look at the tokenizer alone
        print(json.dumps({k: v for k, v in report["vq"].items() if k != "config"}, indent=1))
        return

    t = time.monotonic()
    codes = encode_all(enc, images)
    val_codes = encode_all(enc, val_images)
    report["encode_s"] = round(time.monotonic() - t)
    log(f"encoded {len(codes)} scenes in {report['encode_s']} s")

    tok_dir = args.out.with_name(args.out.name + ".tokenizer")
    tokenizer = save_tokenizer(tok_dir)
    model = train_lm(args, tokenizer, [s.caption for s in train_scenes], codes, object_cells(images),
                     [s.caption for s in val_scenes], val_codes, clock, report, enc,
                     auxiliary_labels(train_scenes) if args.lm_aux_weight > 0 else None)
    polish_decoder(args, enc, dec, images, codes, val_images, report)
    save_model(model, dec, tok_dir, args.out)
    shutil.rmtree(tok_dir)
    report["total_s"] = round(clock.elapsed())
    report["reproduce"] = (
        f"python scripts/train_demo_model.py --seed {args.seed} --budget-min 0 "
        f"--scenes {args.scenes} --val-scenes {args.val_scenes} "
        f"--vq-warmup-steps {report['vq']['steps']['warmup']} "
        f"--vq-crop-steps {report['vq']['steps']['crops']} "
        f"--vq-full-steps {report['vq']['steps']['full']} --lm-steps {report['lm']['steps']} "
        f"--lm-object-weight {args.lm_object_weight:g}"
        + lm_flags(args, report["lm"])
        + f" --polish-steps {args.polish_steps}"
        + scene_flags(args)
        + ("" if args.compile else " --no-compile")
    )
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2))
    log(f"done in {report['total_s'] / 60:.1f} min; checkpoint {report['checkpoint_bytes'] / 1e6:.1f} MB "
        f"in {args.out}")
    log("reproduce with: " + report["reproduce"])


if __name__ == "__main__":
    main()
