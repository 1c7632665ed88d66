"""LlamaGen-T2I GPT checkpoint files: reading, checking and converting to a servable folder.

LlamaGen's .pt holds the weights under "model" (or "module"/"state_dict")
beside optimizer state, "steps" and the training "args" Namespace; it is read
with vllm_sjd.checkpoints (weights_only, argparse.Namespace the only extra
global). A safetensors file with the same key names is read directly
(`write_model_dir` converts). Key names: tok_embeddings, layers.N.attention.
{wqkv,wo}, layers.N.feed_forward.{w1,w2,w3}, layers.N.{attention,ffn}_norm,
norm, output, cls_embedding.cap_proj.{fc1,fc2}, cls_embedding.uncond_embedding.
No vLLM imports: the API server's caption encoder reads the caption embedder
through this module.
"""

import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from vllm_sjd.checkpoints import CheckpointError, fit_problems, torch_load
from vllm_sjd.models.llamagen_config import LlamaGenConfig, llamagen_config

# Entries of a LlamaGen training checkpoint that hold the weights, in the
# order sample_t2i.py looks for them.
WRAPPER_KEYS = ("model", "module", "state_dict")
# Prefixes torch.compile / DDP may leave on the keys.
STRIPPED_PREFIXES = ("_orig_mod.", "module.")
CAPTION_KEYS = ("cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight")




def checkpoint_entries(
    weights: Iterable[tuple[str, object]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """LlamaGen weight names and tensors from a checkpoint's top-level items.

    A training checkpoint yields ("model", {...}), ("optimizer", {...}),
    ("steps", n), ("args", Namespace): the first wrapper entry (WRAPPER_KEYS
    order of appearance) is unpacked, the rest skipped. A flat state dict
    passes through. Compile/DDP prefixes are stripped; "freqs_cis" (a rotary
    cache some exports save) is dropped.
    """
    unwrapped = False
    for name, value in weights:
        if isinstance(value, Mapping):
            if name in WRAPPER_KEYS and not unwrapped:
                unwrapped = True
                yield from checkpoint_entries(value.items())
            continue
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in STRIPPED_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name == "freqs_cis":
            continue
        yield name, value


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files vLLM would read from a model folder: safetensors, else .pt."""
    folder = Path(model_dir)
    for pattern in ("*.safetensors", "*.pt"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(f"{folder}: no *.safetensors or *.pt weights")


def read_state_dict(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """LlamaGen GPT weights from a .pt (weights_only) or .safetensors file, or a
    model folder; `keys` restricts the result (and, for safetensors and
    memory-mapped .pt files, what is read)."""
    path = Path(path)
    files = weight_files(path) if path.is_dir() else [path]
    wanted = None if keys is None else set(keys)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = [n for n in f.keys() if wanted is None or n in wanted]
                state.update((n, f.get_tensor(n)) for n in names)
            continue
        try:
            loaded = torch_load(file, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            loaded = torch_load(file)
        if not isinstance(loaded, Mapping):
            raise CheckpointError(f"{file}: expected a dict, got {type(loaded).__name__}")
        for name, tensor in checkpoint_entries(loaded.items()):
            if wanted is None or name in wanted:
                state[name] = tensor
    if wanted is not None and (missing := sorted(wanted - set(state))):
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    return state


def write_model_dir(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    gpt_model: str = "GPT-XL",
    image_size: int | None = None,
    safetensors: bool = True,
    **config_overrides,
) -> Path:
    """A folder vLLM can serve: config.json plus the weights.

    safetensors=True writes model.safetensors with the model weights under
    LlamaGen's own key names (fast to load, no pickle); False links the .pt
    into the folder (vLLM then reads it with weights_only=True). image_size
    defaults to the number in the file name (t2i_XL_stage1_256.pt -> 256).
    """
    checkpoint, out = Path(checkpoint), Path(out_dir)
    if image_size is None:
        match = re.search(r"_(256|384|512)\.", checkpoint.name)
        if match is None:
            raise ValueError(f"give image_size: {checkpoint.name} does not name 256, 384 or 512")
        image_size = int(match.group(1))
    config = llamagen_config(gpt_model, image_size, **config_overrides)
    state = read_state_dict(checkpoint)
    check_state_dict(state, config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        link = out / checkpoint.name
        if not link.exists():
            link.symlink_to(checkpoint.resolve())
    return out


def expected_shapes(config: LlamaGenConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of a LlamaGen-T2I GPT checkpoint and its shape."""
    d, hd = config.hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    shapes = {
        "tok_embeddings.weight": (config.codebook_size, d),
        "norm.weight": (d,),
        "output.weight": (config.codebook_size, d),
        "cls_embedding.cap_proj.fc1.weight": (d, config.caption_dim),
        "cls_embedding.cap_proj.fc2.weight": (d, d),
        "cls_embedding.uncond_embedding": (config.cls_token_num, config.caption_dim),
    }
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wqkv.weight"] = (qkv, d)
        shapes[p + "attention.wo.weight"] = (d, config.num_attention_heads * hd)
        shapes[p + "feed_forward.w1.weight"] = (config.intermediate_size, d)
        shapes[p + "feed_forward.w3.weight"] = (config.intermediate_size, d)
        shapes[p + "feed_forward.w2.weight"] = (d, config.intermediate_size)
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
    return shapes


def check_state_dict(state: Mapping[str, torch.Tensor], config: LlamaGenConfig) -> None:
    """Raise CheckpointError unless `state` is exactly the config's GPT."""
    if "cls_embedding.embedding_table.weight" in state:
        raise CheckpointError(
            "this is a class-conditional (c2i) LlamaGen checkpoint; only t2i is supported"
        )
    problems = fit_problems(state, expected_shapes(config), limit=6)
    if problems:
        raise CheckpointError(
            "the checkpoint does not fit the config (right GPT size and image size?) -- "
            + "; ".join(problems)
        )
