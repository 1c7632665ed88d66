"""The image endpoint's prompts: a caption to the engine prompts of one image, per family.

Most families take text: the layout's template through the served model's
tokenizer, and the layout's unconditional prompt for guidance
(`TextPrompts`). LlamaGen-T2I takes caption embeddings: the API server holds
the FLAN-T5 encoder, the caption becomes `{"prompt_embeds": ...}` and the
null caption, of the same length, the unconditional token ids
(`CaptionEmbeddingPrompts`; the engine needs --skip-tokenizer-init and
--enable-prompt-embeds, which `vllm-sjd serve` adds for such a model).

Image options (`--additional-config '{"sjd_image": {...}}'`) for LlamaGen:
`text_encoder` (the FLAN-T5 folder: encoder weights and tokenizer, read from
disk only), `text_encoder_device` (default "cpu") and `text_encoder_dtype`
(default "float32").
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_DEVICE = "text_encoder_device"
TEXT_ENCODER_DTYPE = "text_encoder_dtype"


@dataclass(frozen=True)
class ImagePrompts:
    """The engine prompts of one caption."""

    conditional: dict  # a vLLM prompt: {"prompt_token_ids": ...} or {"prompt_embeds": ...}
    num_tokens: int
    unconditional_token_ids: list[int] | None  # None: unguided


class TextPrompts:
    """A text prompt through the layout's template and the served tokenizer."""

    def __init__(self, layout, tokenizer) -> None:
        self.layout = layout
        self.tokenizer = tokenizer

    async def make(self, caption: str, width: int, height: int, guided: bool) -> ImagePrompts:
        ids = self.tokenizer(self.layout.prompt(caption, width, height))["input_ids"]
        if not guided:
            unconditional = None
        elif hasattr(self.layout, "unconditional_of"):  # made from the caption's tokens (Janus)
            unconditional = self.layout.unconditional_of(ids, self.tokenizer)
        else:
            unconditional = self.layout.unconditional_prompt_token_ids(self.tokenizer, width, height)
        return ImagePrompts({"prompt_token_ids": ids}, len(ids), unconditional)


class CaptionEmbeddingPrompts:
    """LlamaGen-T2I: FLAN-T5 caption embeddings, encoded beside the event loop.

    One worker thread: captions are encoded one at a time (the tokenizer is
    not safe to share between threads), and the event loop, which streams
    every other request's events, never waits for the encoder.
    """

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sjd-text-encoder")

    async def make(self, caption: str, width: int, height: int, guided: bool) -> ImagePrompts:
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(self._worker, self.encoder.prompt, caption)
        length = int(prompt["prompt_embeds"].shape[0])
        unconditional = self.encoder.unconditional_prompt_token_ids(prompt) if guided else None
        return ImagePrompts(prompt, length, unconditional)


def needs_caption_embeddings(hf_config) -> bool:
    from vllm_sjd.models.llamagen_config import LlamaGenConfig

    return getattr(hf_config, "model_type", None) == LlamaGenConfig.model_type


def prompts_for(engine_client, layout, options: dict):
    """The prompt maker of the served model; ValueError where it cannot have one."""
    model_config = engine_client.model_config
    if not needs_caption_embeddings(model_config.hf_config):
        return TextPrompts(layout, engine_client.renderer.get_tokenizer())
    folder = options.get(TEXT_ENCODER)
    if not folder:
        raise ValueError(
            "LlamaGen-T2I's captions need the FLAN-T5 encoder in the API server: "
            "--additional-config '{\"sjd_image\": {\"text_encoder\": \"/models/flan-t5-xl\"}}'"
        )
    if not model_config.enable_prompt_embeds:
        raise ValueError("LlamaGen-T2I's captions are prompt embeddings: serve with "
                         "--enable-prompt-embeds (and --skip-tokenizer-init)")
    from vllm_sjd.llamagen_text import LlamaGenTextEncoder

    dtype_name = options.get(TEXT_ENCODER_DTYPE, "float32")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"sjd_image.{TEXT_ENCODER_DTYPE}: {dtype_name!r} is not a torch dtype")
    try:
        encoder = LlamaGenTextEncoder(folder, model_config.model, dtype=dtype,
                                      device=options.get(TEXT_ENCODER_DEVICE, "cpu"))
    except OSError as e:  # no such folder, or no T5 in it
        raise ValueError(f"sjd_image.{TEXT_ENCODER}: {e}") from None
    return CaptionEmbeddingPrompts(encoder)
