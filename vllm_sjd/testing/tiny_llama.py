"""Tiny random-weight Llama checkpoints with a word-level tokenizer, for tests.

vLLM's CPU attention needs head_dim >= 32; everything else is as small as it
gets. Two knobs shape the next-token distributions:
- `sharpness` scales the context-dependent part of the output head;
- `preference` adds a context-free logit preference (one residual dimension is
  held constant and read by the head), so that next-token distributions change
  little with the recent tokens. That is what makes Jacobi drafts, which are
  conditioned on not-yet-verified tokens, acceptable: image models get it from
  spatial smoothness, a random model has none of it.
"""

import json
from pathlib import Path

import torch

from vllm_sjd.word_tokenizer import save_word_level_tokenizer


def token_text(token_id: int) -> str:
    return f"t{token_id}"


def build_tiny_llama(
    path: Path,
    *,
    vocab_size: int = 64,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    sharpness: float = 1.0,
    preference: float = 0.0,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, param.shape[-1] ** -0.5)
        model.lm_head.weight.mul_(sharpness)
        if preference:
            # Residual dimension 0 carries a constant; the head turns it into
            # a fixed logit preference over the vocabulary.
            model.model.embed_tokens.weight[:, 0] = 4.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[0].zero_()
                layer.mlp.down_proj.weight[0].zero_()
            model.lm_head.weight[:, 0] = torch.randn(vocab_size) * preference
    model.save_pretrained(path, safe_serialization=True)

    vocab = {token_text(i): i for i in range(vocab_size)}
    save_word_level_tokenizer(
        path, vocab, unk_token=token_text(3),
        special_tokens={"bos_token": token_text(0), "eos_token": token_text(1),
                        "pad_token": token_text(2)},
    )
    # Keep the checkpoint self-describing for readers of the test folder.
    (path / "TINY_MODEL.json").write_text(
        json.dumps({"sharpness": sharpness, "seed": seed, "vocab_size": vocab_size})
    )
    return path


def exact_continuation_probs(
    path: Path,
    prompt: list[int],
    length: int,
    *,
    temperature: float,
    top_k: int,
    grid=None,
    guidance_scale: float = 1.0,
    unconditional_prompt: list[int] | None = None,
    chameleon: bool = False,
) -> dict[tuple[int, ...], float]:
    """Exact AR probabilities of every length-`length` continuation.

    Teacher-forces the same weights with transformers, applying classifier-free
    guidance (uncond + s * (cond - uncond), the unconditional stream seeing
    `unconditional_prompt` and the same continuation), the image layout `grid`
    (if any), temperature and then top-k to each step's logits, as the SJD
    runner and vLLM's sampler do. `chameleon`: a Chameleon checkpoint, whose
    image-token logits are read unmasked (tiny_chameleon.reference_logits).
    """
    from transformers import ChameleonForConditionalGeneration, LlamaForCausalLM

    model_class = ChameleonForConditionalGeneration if chameleon else LlamaForCausalLM
    model = model_class.from_pretrained(path, dtype=torch.float32).eval()

    def last_logits(context: list[int], prefixes) -> torch.Tensor:
        batch = torch.tensor([context + list(p) for p in prefixes])
        with torch.no_grad():
            if chameleon:
                hidden = model.model(input_ids=batch).last_hidden_state[:, -1]
                return model.lm_head(hidden).to(torch.float64)
            return model(batch).logits[:, -1, :].to(torch.float64)

    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for step in range(length):
        prefixes = list(probs)
        logits = last_logits(prompt, prefixes)
        if guidance_scale != 1.0:
            uncond = last_logits(unconditional_prompt, prefixes)
            logits = uncond + guidance_scale * (logits - uncond)
        logits = logits / temperature
        if grid is not None:
            allowed = grid.allowed_mask(torch.tensor([step]), logits.shape[-1])
            logits = logits.masked_fill(~allowed, float("-inf"))
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        step = torch.softmax(logits, dim=-1)
        grown: dict[tuple[int, ...], float] = {}
        for prefix, row in zip(prefixes, step):
            for token in torch.nonzero(row > 0).flatten().tolist():
                grown[prefix + (token,)] = probs[prefix] * float(row[token])
        probs = grown
    return probs


def greedy_continuation(path: Path, prompt: list[int], length: int) -> list[int]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(length):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]
