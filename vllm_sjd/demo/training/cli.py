"""The command line: flags, then the phases in order (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from vllm_sjd import demo
from vllm_sjd.demo import training
from vllm_sjd.demo.training.clock import Clock, log
from vllm_sjd.demo.training.design import DEFAULT_LM_WIDTH
from vllm_sjd.demo.training.images import render_all, training_scenes
from vllm_sjd.demo.training.lm import train_lm
from vllm_sjd.demo.training.lm_batches import auxiliary_labels, object_cells
from vllm_sjd.demo.training.saving import (
    DEMO_MODEL_DIR,
    polish_reproduce_command,
    reproduce_command,
    save_decoder,
    save_model,
    save_tokenizer,
    write_report,
)
from vllm_sjd.demo.training.vq import encode_all, polish_decoder, train_vq


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=training.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if args.lm_width % 64:
        ap.error(f"--lm-width {args.lm_width} is not a multiple of 64")
    if args.lm_lr_decay and args.lm_decay_steps is None and args.budget_min <= 0:
        ap.error("--lm-lr-decay without a clock (--budget-min 0) needs --lm-decay-steps")

    torch.set_num_threads(2)
    if args.polish_from:
        polish_checkpoint(args)
    else:
        train(args)


def train(args):
    """All five phases, then the checkpoint and its report in args.out."""
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
    report["reproduce"] = reproduce_command(args, report)
    write_report(report, args.out)
    log(f"done in {report['total_s'] / 60:.1f} min; checkpoint {report['checkpoint_bytes'] / 1e6:.1f} MB "
        f"in {args.out}")
    log("reproduce with: " + report["reproduce"])


def polish_checkpoint(args) -> None:
    """Run phase 5 on a saved checkpoint (the same function a full run ends with)."""
    path = args.polish_from
    report = json.loads((path / "train_report.json").read_text())
    enc, dec = demo.load_encoder(path), demo.load_decoder(path)
    images = render_all(training_scenes(args, args.seed, args.scenes))
    val_images = render_all(training_scenes(args, args.seed + 1, args.val_scenes))
    polish_decoder(args, enc, dec, images, encode_all(enc, images), val_images, report)
    save_decoder(dec, path / "vq" / "decoder.safetensors")
    report["reproduce"] += polish_reproduce_command(args)
    write_report(report, path)
