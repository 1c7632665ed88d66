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
"""

from functools import cached_property

from vllm_sjd.models.layout import ImageGrid, require_supported

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
# Lumina-mGPT's conversation format: the human turn, closed by the separator;
# the model's answer (the image) follows.
PROMPT_TEMPLATE = (
    "Generate an image of {width}x{height} according to the following prompt:\n{prompt}"
    + TURN_SEPARATOR
)


def _chameleon_grid(width: int, height: int, header: tuple[int, ...], row_end: int | None) -> ImageGrid:
    return ImageGrid(
        width=width,
        height=height,
        rows=height // DOWNSAMPLE,
        cols=width // DOWNSAMPLE,
        header=header,
        row_end=row_end,
        trailer=(IMAGE_END,),
        code_low=CODE_LOW,
        code_high=CODE_HIGH,
    )


def bucket_sizes(target_size: int) -> list[tuple[int, int]]:
    """(width, height) buckets of a Lumina-mGPT checkpoint trained at target_size."""
    budget = round((target_size / SIZE_UNIT) ** 2)
    sizes = []
    wide, high = budget, 1
    while wide > 0:
        if max(wide, high) / min(wide, high) <= MAX_ASPECT:
            sizes.append((wide * SIZE_UNIT, high * SIZE_UNIT))
        if (high + 1) * wide <= budget:
            high += 1
        else:
            wide -= 1
    return sizes


class ChameleonImageLayout:
    """Lumina-mGPT's image layout for a checkpoint trained at `target_size` px."""

    def __init__(self, target_size: int = 768):
        if target_size % SIZE_UNIT:
            raise ValueError(f"target_size must be a multiple of {SIZE_UNIT}, got {target_size}")
        self.target_size = target_size

    @cached_property
    def sizes(self) -> list[tuple[int, int]]:
        return bucket_sizes(self.target_size)

    @property
    def default_size(self) -> tuple[int, int]:
        return (self.target_size, self.target_size)

    def grid(self, width: int, height: int) -> ImageGrid:
        require_supported(self.sizes, width, height)
        size_tokens = (SIZE_TOKEN_BASE + height // SIZE_UNIT, SIZE_TOKEN_BASE + width // SIZE_UNIT)
        return _chameleon_grid(width, height, (IMAGE_START, *size_tokens), END_OF_LINE)

    def prompt(self, text: str, width: int, height: int) -> str:
        return PROMPT_TEMPLATE.format(width=width, height=height, prompt=text)


class AnoleImageLayout:
    """Chameleon's own image format, as Anole generates it: 512x512 only."""

    sizes = [(512, 512)]
    default_size = (512, 512)

    def grid(self, width: int, height: int) -> ImageGrid:
        require_supported(self.sizes, width, height)
        return _chameleon_grid(width, height, (IMAGE_START,), None)

    def prompt(self, text: str, width: int, height: int) -> str:
        return text
