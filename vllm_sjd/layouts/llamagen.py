"""LlamaGen-T2I's image layout: a bare grid of VQ codes at its one trained size.

Token ids (vllm_sjd/models/llamagen_config.py has the checkpoint facts): image
codes are ids 0..codebook_size-1; id codebook_size + i is the null caption of
caption slot i, the unconditional prompt of classifier-free guidance.
"""

from vllm_sjd.layouts.grid import ImageGrid, require_supported


class LlamaGenImageLayout:
    """LlamaGen-T2I's bare latent grid at the one size its checkpoint was trained for."""

    # Reference sampling (LlamaGen's sample_t2i.py): CFG 7.5, top-k 1000, temperature 1.
    default_guidance_scale = 7.5
    default_top_k = 1000

    def __init__(
        self,
        image_size: int = 256,
        downsample: int = 16,
        codebook_size: int = 16384,
        cls_token_num: int = 120,
    ):
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} is not a multiple of downsample {downsample}")
        self.image_size = image_size
        self.downsample = downsample
        self.codebook_size = codebook_size
        self.cls_token_num = cls_token_num
        self.sizes = [(image_size, image_size)]
        self.default_size = (image_size, image_size)

    @classmethod
    def from_config(cls, hf_config) -> "LlamaGenImageLayout":
        return cls(hf_config.image_size, hf_config.downsample, hf_config.codebook_size,
                   hf_config.cls_token_num)

    def grid(self, width: int, height: int) -> ImageGrid:
        require_supported(self.sizes, width, height)
        return ImageGrid(
            width=width,
            height=height,
            rows=height // self.downsample,
            cols=width // self.downsample,
            header=(),
            row_end=None,
            trailer=(),
            code_low=0,
            code_high=self.codebook_size,
        )

    def null_caption_id(self, slot: int) -> int:
        """The token id the model embeds as the null caption of caption slot `slot`."""
        if not 0 <= slot < self.cls_token_num:
            raise ValueError(f"caption slot {slot} outside [0, {self.cls_token_num})")
        return self.codebook_size + slot

    def unconditional_prompt_token_ids(
        self, tokenizer=None, width: int | None = None, height: int | None = None,
        *, caption_length: int | None = None,
    ) -> list[int]:
        """The null-caption prompt for classifier-free guidance, as token ids.

        tokenizer, width, height: unused (the other families' signature; the
        null caption is the same at every size). caption_length: the number of
        caption rows of the conditional prompt it is paired with, i.e. that
        prompt's length; default cls_token_num. LlamaGen left-pads captions and
        masks the padding in both streams, so a caption of L rows sits in slots
        120-L..119 and its unconditional partner is the null caption of those
        slots (the same length, so both streams reach the image together).
        """
        length = self.cls_token_num if caption_length is None else caption_length
        if not 1 <= length <= self.cls_token_num:
            raise ValueError(f"caption_length must be 1..{self.cls_token_num}, got {length}")
        first = self.cls_token_num - length
        return [self.codebook_size + slot for slot in range(first, self.cls_token_num)]
