"""Janus-Pro's image layout: a bare 24x24 grid of codes (384 px, 16x VQ), no end-of-line.

Token ids: code c is id text_vocab_size + c (vllm_sjd/models/janus.py). The
prompt is the reference's (deepseek-ai/Janus generation_inference.py): the
conversation `<|User|>: {prompt}\\n\\n<|Assistant|>:` in its "deepseek" SFT
format with an empty system prompt, closed by the image-start tag
`<begin_of_image>`; the tokenizer adds BOS. Its guidance recipe: scale 5, the
unconditional prompt is the conditional one with every token but the first
(BOS) and the last (the image-start tag) replaced by the pad token; temperature
1, no top-k.
"""

from vllm_sjd.layouts.grid import ImageGrid, require_supported

PROMPT_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:<begin_of_image>"


class JanusImageLayout:
    default_guidance_scale = 5.0

    def __init__(self, text_vocab_size: int, num_codes: int = 16384, image_size: int = 384,
                 patch_size: int = 16) -> None:
        self.text_vocab_size = text_vocab_size
        self.num_codes = num_codes
        self.side = image_size // patch_size
        self.patch_size = patch_size
        self.sizes = [(image_size, image_size)]
        self.default_size = (image_size, image_size)
        self.default_top_k = num_codes  # none: every code stays a candidate

    @classmethod
    def from_config(cls, hf_config) -> "JanusImageLayout":
        from vllm_sjd.models.janus_config import text_vocab_size

        vision = hf_config.vision_config
        return cls(text_vocab_size(hf_config.text_config), hf_config.vq_config.num_embeddings,
                   vision.image_size, vision.patch_size)

    def grid(self, width: int, height: int) -> ImageGrid:
        require_supported(self.sizes, width, height)
        return ImageGrid(
            width=width, height=height, rows=self.side, cols=self.side, header=(),
            row_end=None, trailer=(), code_low=self.text_vocab_size,
            code_high=self.text_vocab_size + self.num_codes,
        )

    def prompt(self, text: str, width: int, height: int) -> str:
        return PROMPT_TEMPLATE.format(prompt=text)

    def unconditional_of(self, conditional_ids, tokenizer) -> list[int]:
        """The reference's unconditional prompt: the caption's tokens padded out."""
        ids = list(conditional_ids)
        if len(ids) < 2:
            raise ValueError("a Janus prompt has at least BOS and the image-start tag")
        return [ids[0], *[tokenizer.pad_token_id] * (len(ids) - 2), ids[-1]]
