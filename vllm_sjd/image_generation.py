"""From a prompt to an image: sampling parameters for a grid, tokens to pixels.

`image_sampling_params` makes a request generate exactly one image of the
grid's layout (the SJD runner enforces the layout per position), guided with
classifier-free guidance when given a scale above 1 and the family's
unconditional prompt; `decode_image` turns the generated tokens into a PIL
image with a family's VQ decoder.
"""

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from vllm import SamplingParams

from vllm_sjd.guidance import guidance_extra_args
from vllm_sjd.layouts.constraints import image_extra_args
from vllm_sjd.layouts.grid import ImageGrid


def image_sampling_params(
    grid: ImageGrid,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    guidance_scale: float = 1.0,
    unconditional_prompt_token_ids: Sequence[int] | None = None,
) -> SamplingParams:
    """Sampling parameters for one image of `grid`.

    guidance_scale > 1 turns on classifier-free guidance; the engine then runs
    an unconditional twin from `unconditional_prompt_token_ids` (the layout's
    `unconditional_prompt_token_ids(...)` gives the family's own).
    """
    # The layout forces every structural token, so max_tokens alone ends the
    # image; min_tokens would mask an EOS that the layout forces (Emu3).
    extra_args = image_extra_args(grid)
    extra_args.update(guidance_extra_args(guidance_scale, unconditional_prompt_token_ids))
    if top_k is not None and top_k >= grid.code_high - grid.code_low:
        # The layout leaves no position more candidates than the codes, so
        # such a top-k keeps every one: skip vLLM's top-k pass over the vocabulary.
        top_k = None
    return SamplingParams(
        max_tokens=grid.num_tokens,
        ignore_eos=True,
        temperature=temperature,
        top_k=top_k if top_k is not None else 0,
        top_p=top_p,
        seed=seed,
        extra_args=extra_args,
    )


def decode_image(
    tokens: Sequence[int],
    grid: ImageGrid,
    to_codebook: Callable[[torch.Tensor], torch.Tensor],
    decoder,
) -> Image.Image:
    """Generated tokens -> the [rows, cols] codes -> pixels (grid.width x grid.height)."""
    return decode_codes(grid.codes(tokens), grid, to_codebook, decoder)


def decode_codes(codes: torch.Tensor, grid: ImageGrid, to_codebook, decoder) -> Image.Image:
    """[rows, cols] image token ids -> pixels (grid.width x grid.height)."""
    with torch.no_grad():
        pixels = decoder.decode(to_codebook(codes).unsqueeze(0))
    image = decoder.to_pil(pixels)[0]
    if image.size != (grid.width, grid.height):
        raise ValueError(
            f"the VQ decoder made a {image.size[0]}x{image.size[1]} image for a "
            f"{grid.width}x{grid.height} grid; its downsampling does not match the layout"
        )
    return image


# What a partial image shows where rows are not drawn yet.
NEUTRAL_GREY = (128, 128, 128)


def decode_partial_image(
    tokens: Sequence[int], grid: ImageGrid, to_codebook, decoder
) -> Image.Image:
    """The image rows complete in `tokens` (the first tokens of an image), the rest grey.

    The missing rows are decoded from a copy of the last complete row (the
    VQ decoder sees a plausible neighbour at the border) and then painted over.
    """
    body = max(len(tokens) - len(grid.header), 0)
    done = min(body // grid.row_stride, grid.rows)
    image = Image.new("RGB", (grid.width, grid.height), NEUTRAL_GREY)
    if done == 0:
        return image
    start = len(grid.header)
    rows = torch.as_tensor(list(tokens[start : start + done * grid.row_stride]), dtype=torch.int64)
    rows = rows.view(done, grid.row_stride)[:, : grid.cols]
    codes = torch.cat([rows, rows[-1:].expand(grid.rows - done, -1)])
    drawn = decode_codes(codes, grid, to_codebook, decoder)
    height = done * grid.height // grid.rows
    image.paste(drawn.crop((0, 0, grid.width, height)), (0, 0))
    return image
