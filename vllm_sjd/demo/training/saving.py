"""The checkpoint on disk: tokenizer, weights and config, the training report
and its reproduce line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import vllm_sjd
from vllm_sjd import demo
from vllm_sjd.demo import scenes as sc
from vllm_sjd.demo.training.design import (
    DEFAULT_LM_WIDTH,
    DOWNSAMPLE,
    NUM_CODES,
    SIZE_TOKEN_IDS,
    vocabulary,
)
from vllm_sjd.layouts import chameleon as cl
from vllm_sjd.word_tokenizer import save_word_level_tokenizer

DEMO_MODEL_DIR = demo.MODEL_PATH  # where the package loads it from
# The reproduce lines name paths from here (the checkout they are run in).
SOURCE_ROOT = Path(vllm_sjd.__file__).resolve().parent.parent
# Sampling defaults for requests that name none (vLLM reads generation_config.json):
# at temperature 0.8 the pictures carry fewer stray blobs than at 1 and pass more
# whole captions (benchmarks/RESULTS.md, "Sampling settings").
DEMO_GENERATION_CONFIG = {"do_sample": True, "temperature": 0.8}


def save_tokenizer(path: Path):
    """The word-level tokenizer of vocabulary(); Chameleon's image-structure
    and size tokens are special, so no text splits or merges them."""
    specials = [cl.TURN_SEPARATOR, "<racm3:break>", "<eoss>", "<reserved08799>",
                *(cl.reserved_token_name(i) for i in SIZE_TOKEN_IDS)]
    return save_word_level_tokenizer(
        path, vocabulary(), unk_token="<unk>",
        special_tokens={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
        additional_special_tokens=specials,
    )


def save_decoder(dec, path: Path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, str(path))


def save_model(model, dec, tokenizer_dir: Path, out: Path):
    """Write the checkpoint to a sibling folder, then move it to `out`."""
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
    save_decoder(dec, tmp / "vq" / "decoder.safetensors")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


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


def reproduce_command(args, report: dict) -> str:
    """The command that trains this checkpoint again: the clock off, the step
    counts the run reached."""
    return (
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


def polish_reproduce_command(args) -> str:
    """The --polish-from run, as a command of its own after the training's.

    A second polish is a second command: appending its flag to the first would
    name one polish (argparse keeps the last --polish-steps), not both."""
    return (
        f" && python scripts/train_demo_model.py --seed {args.seed} --scenes {args.scenes} "
        f"--val-scenes {args.val_scenes} --polish-from {DEMO_MODEL_DIR.relative_to(SOURCE_ROOT)} "
        f"--polish-steps {args.polish_steps}" + scene_flags(args))


def write_report(report: dict, checkpoint: Path):
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    (checkpoint / "train_report.json").write_text(json.dumps(report, indent=2))
