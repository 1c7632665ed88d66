"""A tiny random-weight Janus-Pro checkpoint in transformers' format.

`JanusForConditionalGeneration` saved by transformers (safetensors, real key
names: model.language_model.*, model.generation_embeddings, .generation_aligner,
.generation_head, model.vision_model.*, model.aligner.*, model.vqmodel.*,
lm_head), with Janus-Pro's geometry where it matters: 16x VQ (five levels), an
image of vision image_size / patch_size codes a side, a generation aligner and
head between the codes and the language model. It is only narrow (64 wide), a
128 px image (8 x 8 codes) and 64 codes. The tokenizer is word-level with
Janus's special tokens (BOS prepended, as Janus's tokenizer does).
"""

from pathlib import Path

import torch

from vllm_sjd.word_tokenizer import save_word_level_tokenizer

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIAL = ["<|User|>", "<|Assistant|>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>"]
WORDS = [":", "a", "red", "blue", "circle", "square", "on", "black", "background", "cat"]
IMAGE_SIZE = 128
NUM_CODES = 64
TEXT_VOCAB = 32  # rows of the text embedding, past the tokenizer's words (as Janus pads its own)


def tokenizer_vocab() -> dict[str, int]:
    words = ["<unk>", BOS, EOS, PAD, *SPECIAL, *WORDS]
    return {w: i for i, w in enumerate(words)}


def tiny_janus_config(image_size: int = IMAGE_SIZE, **text_overrides):
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    vocab = tokenizer_vocab()
    text = LlamaConfig(vocab_size=TEXT_VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD],
                       **text_overrides)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=image_size, patch_size=16, projection_dim=64,
                               num_image_tokens=(image_size // 16) ** 2)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=NUM_CODES, latent_channels=32,
                          base_channels=32, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=1,
                          projection_dim=64, image_token_embed_dim=64, num_hidden_layers=2)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=vocab["<image_placeholder>"], tie_word_embeddings=False)


def build_tiny_janus(path: Path, *, seed: int = 0, sharpness: float = 8.0,
                     image_size: int = IMAGE_SIZE) -> Path:
    """Save the tiny checkpoint and tokenizer to `path`. `sharpness` scales the
    generation head, so that the image codes' logits are far from uniform."""
    from transformers import JanusForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(tiny_janus_config(image_size)).eval()
    with torch.no_grad():
        model.model.generation_head.vision_head.weight.mul_(sharpness)
        model.model.generation_embeddings.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    save_word_level_tokenizer(
        path, tokenizer_vocab(), unk_token="<unk>",
        special_tokens={"bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
        additional_special_tokens=SPECIAL, prepend_bos=BOS,
    )
    return path


def load_reference(path: Path):
    """transformers' model of the checkpoint at `path`, float32, eval."""
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def reference_guided_greedy(model, cond_ids: list[int], uncond_ids: list[int], scale: float,
                            num_tokens: int) -> list[int]:
    """Janus's guided image decoding, greedily, with transformers' modules: the
    pair's hidden states through the generation head, uncond + s (cond - uncond),
    the chosen code fed back through the generation embedding and aligner."""
    embed = model.get_input_embeddings()
    streams = [embed(torch.tensor([ids])) for ids in (cond_ids, uncond_ids)]
    codes: list[int] = []
    for _ in range(num_tokens):
        cond, uncond = (model.model.generation_head(
            model.model.language_model(inputs_embeds=s).last_hidden_state[0, -1]) for s in streams)
        code = int((uncond + scale * (cond - uncond)).argmax())
        codes.append(code)
        step = model.prepare_embeddings_for_image_generation(torch.tensor([[code]]))
        streams = [torch.cat([s, step], dim=1) for s in streams]
    return codes


@torch.no_grad()
def exact_guided_code_probs(model, cond_ids: list[int], uncond_ids: list[int], scale: float,
                            length: int, *, temperature: float, top_k: int) -> dict[tuple, float]:
    """Exact probabilities of every `length`-code image under Janus's guidance
    (uncond + s (cond - uncond) of the generation head), temperature, then top-k,
    by teacher forcing transformers' modules over every prefix."""
    embed = model.get_input_embeddings()
    probs: dict[tuple, float] = {(): 1.0}
    for step in range(length):
        prefixes = list(probs)
        heads = []
        for ids in (cond_ids, uncond_ids):
            inputs = embed(torch.tensor([ids] * len(prefixes)))
            if step:
                codes = model.prepare_embeddings_for_image_generation(torch.tensor(prefixes))
                inputs = torch.cat([inputs, codes], dim=1)
            hidden = model.model.language_model(inputs_embeds=inputs).last_hidden_state[:, -1]
            heads.append(model.model.generation_head(hidden).double())
        logits = (heads[1] + scale * (heads[0] - heads[1])) / temperature
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        rows = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        grown: dict[tuple, float] = {}
        for prefix, row in zip(prefixes, rows):
            for code in torch.nonzero(row > 0).flatten().tolist():
                grown[prefix + (code,)] = probs[prefix] * float(row[code])
        probs = grown
    return probs


def served_heads(hidden: torch.Tensor, model) -> tuple[list, list]:
    """For LLM.apply_model: the served model's lm_head logits and its logits of
    `hidden`, as lists (what comes back from a worker)."""
    with torch.no_grad():
        hidden = hidden.to(next(model.parameters()).device)
        return model.text_logits(hidden).tolist(), model.compute_logits(hidden).tolist()
