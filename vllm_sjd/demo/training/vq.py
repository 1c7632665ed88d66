"""The VQ tokenizer: EMA codebook, training (phase 2), encoding (phase 3) and
the decoder polish on frozen codes (phase 5)."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from vllm_sjd.demo import scenes as sc
from vllm_sjd.demo.training.clock import Clock, log
from vllm_sjd.demo.training.design import DOWNSAMPLE, EMBED_DIM, GRID, NUM_CODES, vq_config
from vllm_sjd.demo.training.images import psnr, to_tensor


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
