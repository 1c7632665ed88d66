"""Image layouts and prompts of the Chameleon family (Lumina-mGPT, Anole).

Token facts from Lumina-mGPT's item processor and generation code: image codes
are BPE ids 4..8195 (8192 VQGAN codes, 16x downsampling); an image is
`<racm3:break>` (8197), a height and a width token `<reserved{8800+n}>`
(id 8804 + n, n = size in 32-px units), then H/16 rows of W/16 codes each
closed by `<reserved08799>` (8803), then `<eoss>` (8196). Sizes come from
Lumina-mGPT's bucket list for the checkpoint's target size (areas up to
target^2 in 32-px steps, aspect ratio at most 4).

Anole keeps Chameleon's own image format (transformers' ChameleonProcessor):
`<racm3:break>`, 1024 codes (32x32 at 512 px, no size or end-of-line
tokens), `<eoss>`.

The image header (start and size tokens) is part of the prompt here, so that
the generated sequence is the image span alone; forcing it or prompting it
gives the same distribution. Guidance follows Lumina-mGPT's reference: the
unconditional stream starts at the image-start token (no text at all) and the
scale is 3.
"""

from functools import cached_property

from vllm_sjd.layouts.grid import ImageGrid, require_supported

IMAGE_START = 8197  # <racm3:break>
IMAGE_END = 8196  # <eoss>
END_OF_LINE = 8803  # <reserved08799>
SIZE_TOKEN_BASE = 8804  # <reserved08800> + n: n units of 32 px
END_OF_TURN = 8710  # <reserved08706>: ends every conversation turn
CODE_LOW, CODE_HIGH = 4, 8196  # image BPE ids [4, 8196)
SIZE_UNIT = 32  # px per size token unit
DOWNSAMPLE = 16  # VQGAN: px per code
MAX_ASPECT = 4.0

TURN_SEPARATOR = "<reserved08706>"
IMAGE_START_NAME = "<racm3:break>"
# Lumina-mGPT's conversation format: the human turn, closed by the separator;
# the model's answer (the image) follows.
PROMPT_TEMPLATE = (
    "Generate an image of {width}x{height} according to the following prompt:\n{prompt}"
    + TURN_SEPARATOR
)


def reserved_token_name(token_id: int) -> str:
    """Chameleon's name of a reserved id: id 4 + n is `<reserved0nnnn>`."""
    return f"<reserved{token_id - 4:05d}>"


def _header_text(header: tuple[int, ...]) -> str:
    return IMAGE_START_NAME + "".join(reserved_token_name(t) for t in header[1:])


def _chameleon_grid(
    width: int, height: int, row_end: int | None, downsample: int = DOWNSAMPLE,
    num_codes: int = CODE_HIGH - CODE_LOW,
) -> ImageGrid:
    return ImageGrid(
        width=width,
        height=height,
        rows=height // downsample,
        cols=width // downsample,
        header=(),  # in the prompt
        row_end=row_end,
        trailer=(IMAGE_END,),
        code_low=CODE_LOW,
        code_high=CODE_LOW + num_codes,
    )


def bucket_sizes(target_size: int, size_unit: int = SIZE_UNIT) -> list[tuple[int, int]]:
    """(width, height) buckets of a Lumina-mGPT checkpoint trained at target_size."""
    budget = round((target_size / size_unit) ** 2)
    sizes = []
    wide, high = budget, 1
    while wide > 0:
        if max(wide, high) / min(wide, high) <= MAX_ASPECT:
            sizes.append((wide * size_unit, high * size_unit))
        if (high + 1) * wide <= budget:
            high += 1
        else:
            wide -= 1
    return sizes


class ChameleonImageLayout:
    """Lumina-mGPT's image layout for a checkpoint trained at `target_size` px.

    `downsample`: px per code of the checkpoint's VQ model (16 for Chameleon's
    VQGAN; the bundled demo model's is 4). Size tokens count units of twice
    that (32 px for Lumina-mGPT). `num_codes`: a VQ codebook smaller than
    Chameleon's 8192 uses the first ids of the image block, 4 .. 4 + num_codes.
    """

    def __init__(
        self, target_size: int = 768, downsample: int = DOWNSAMPLE,
        num_codes: int = CODE_HIGH - CODE_LOW,
    ):
        if downsample < 1:
            raise ValueError(f"downsample must be positive, got {downsample}")
        if not 1 <= num_codes <= CODE_HIGH - CODE_LOW:
            raise ValueError(f"num_codes must be in [1, {CODE_HIGH - CODE_LOW}], got {num_codes}")
        self.num_codes = num_codes
        self.downsample = downsample
        self.size_unit = 2 * downsample
        if target_size % self.size_unit:
            raise ValueError(
                f"target_size must be a multiple of {self.size_unit}, got {target_size}"
            )
        self.target_size = target_size

    @cached_property
    def sizes(self) -> list[tuple[int, int]]:
        return bucket_sizes(self.target_size, self.size_unit)

    @property
    def default_size(self) -> tuple[int, int]:
        return (self.target_size, self.target_size)

    default_guidance_scale = 3.0
    default_top_k = 2000  # Lumina-mGPT's image top-k

    def grid(self, width: int, height: int) -> ImageGrid:
        require_supported(self.sizes, width, height)
        return _chameleon_grid(width, height, END_OF_LINE, self.downsample, self.num_codes)

    def header(self, width: int, height: int) -> tuple[int, ...]:
        """Image start, height and width tokens (the end of the prompt)."""
        unit = self.size_unit
        return (IMAGE_START, SIZE_TOKEN_BASE + height // unit, SIZE_TOKEN_BASE + width // unit)

    def prompt(self, text: str, width: int, height: int) -> str:
        """Lumina-mGPT's templated request, closed by the image header."""
        template = PROMPT_TEMPLATE.format(width=width, height=height, prompt=text)
        return template + _header_text(self.header(width, height))

    def unconditional_prompt_token_ids(self, tokenizer, width: int, height: int) -> list[int]:
        """The reference's unconditional stream: the image header alone."""
        return list(self.header(width, height))


class AnoleImageLayout:
    """Chameleon's own image format, as Anole generates it: 512x512 only."""

    sizes = [(512, 512)]
    default_size = (512, 512)
    # No guidance recipe of Anole's own was checked; pass a scale to guide.
    default_guidance_scale = 1.0
    default_top_k = 2000

    def grid(self, width: int, height: int) -> ImageGrid:
        require_supported(self.sizes, width, height)
        return _chameleon_grid(width, height, None)

    def header(self, width: int, height: int) -> tuple[int, ...]:
        return (IMAGE_START,)

    def prompt(self, text: str, width: int, height: int) -> str:
        return text + IMAGE_START_NAME

    def unconditional_prompt_token_ids(self, tokenizer, width: int, height: int) -> list[int]:
        return [IMAGE_START]
