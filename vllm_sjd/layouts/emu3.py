"""Image layout, prompt and negative prompt of Emu3-Gen.

From Emu3's generation code (BAAI's processing_emu3.py and transformers'
Emu3Processor): the prompt ends with `<|image start|>{h}*{w}<|image token|>`
(h, w in tokens), then the model writes h rows of w visual tokens, each row
closed by `<|extra_200|>`, then `<|extra_201|>` (end of frame), `<|image end|>`
and EOS. The VQ downsamples 8x; sizes follow Emu3's aspect-ratio rule for a
720x720 area (1:1 gives 90x90 tokens). Token ids come from the checkpoint's
vocabulary map, so any vocabulary size works.
"""

from collections.abc import Mapping

from vllm_sjd.layouts.grid import ImageGrid, require_supported

END_OF_LINE = "<|extra_200|>"
END_OF_FRAME = "<|extra_201|>"
IMAGE_START = "<|image start|>"
IMAGE_END = "<|image end|>"
IMAGE_WRAPPER = "<|image token|>"
END_OF_SEQUENCE = "<|extra_204|>"
VISUAL_TOKEN_PREFIX = "<|visual token "
DOWNSAMPLE = 8
IMAGE_AREA = 720 * 720
RATIOS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "2:1", "1:2")

POSITIVE_PROMPT = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, "
    "fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, "
    "signature, watermark, username, blurry."
)


def generate_size(ratio: str, image_area: int = IMAGE_AREA) -> tuple[int, int]:
    """(width, height) in pixels for a "w:h" ratio, as Emu3 sizes its token grid."""
    w, h = map(int, ratio.split(":"))
    scale = (image_area / (w * h)) ** 0.5
    rows, cols = round(h * scale / DOWNSAMPLE), round(w * scale / DOWNSAMPLE)
    return cols * DOWNSAMPLE, rows * DOWNSAMPLE


class Emu3ImageLayout:
    default_guidance_scale = 3.0  # Emu3's reference generation script
    default_top_k = 2048

    def __init__(self, vocabulary_map: Mapping[str, int], image_area: int = IMAGE_AREA):
        missing = [t for t in (END_OF_LINE, END_OF_FRAME, IMAGE_END, END_OF_SEQUENCE)
                   if t not in vocabulary_map]
        if missing:
            raise ValueError(f"Emu3 vocabulary lacks {', '.join(missing)}")
        visual = sorted(i for name, i in vocabulary_map.items() if name.startswith(VISUAL_TOKEN_PREFIX))
        if not visual or visual[-1] - visual[0] + 1 != len(visual):
            raise ValueError("Emu3 visual tokens must be one contiguous id range")
        self.vocabulary_map = vocabulary_map
        self.code_range = (visual[0], visual[-1] + 1)
        self.sizes = list(dict.fromkeys(generate_size(r, image_area) for r in RATIOS))
        self.default_size = generate_size("1:1", image_area)

    def grid(self, width: int, height: int) -> ImageGrid:
        require_supported(self.sizes, width, height)
        v = self.vocabulary_map
        return ImageGrid(
            width=width,
            height=height,
            rows=height // DOWNSAMPLE,
            cols=width // DOWNSAMPLE,
            header=(),  # the size header is part of the prompt
            row_end=v[END_OF_LINE],
            trailer=(v[END_OF_FRAME], v[IMAGE_END], v[END_OF_SEQUENCE]),
            code_low=self.code_range[0],
            code_high=self.code_range[1],
        )

    def prompt(self, text: str, width: int, height: int, *, positive: bool = True) -> str:
        """Emu3's generation prompt; `positive` appends its quality suffix."""
        suffix = POSITIVE_PROMPT if positive else ""
        rows, cols = height // DOWNSAMPLE, width // DOWNSAMPLE
        return f"{text}{suffix}{IMAGE_START}{rows}*{cols}{IMAGE_WRAPPER}"

    def unconditional_prompt(self, width: int, height: int, negative_prompt: str = NEGATIVE_PROMPT) -> str:
        """The negative prompt (by default the reference's) with the size header."""
        return self.prompt(negative_prompt, width, height, positive=False)

    def unconditional_prompt_token_ids(
        self, tokenizer, width: int, height: int, negative_prompt: str = NEGATIVE_PROMPT
    ) -> list[int]:
        return list(tokenizer(self.unconditional_prompt(width, height, negative_prompt))["input_ids"])
