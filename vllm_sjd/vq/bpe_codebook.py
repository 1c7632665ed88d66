"""Image-token ids of a language model's vocabulary <-> VQ codebook indices.

Chameleon's vocabulary names each image token after its code ("IMGIMGBCZ" is
code 12); Emu3's writes "<|visual token 000012|>". `BPEToCodebook` holds the
table either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from vllm_sjd.checkpoints import listing
from vllm_sjd.vq.blocks import is_integer

IMAGE_TOKEN_PREFIX = "IMGIMG"
# Chameleon writes the code's decimal digits as letters, A=0 .. J=9.
_LETTERS_TO_DIGITS = str.maketrans("ABCDEFGHIJ", "0123456789")


def image_token_code(name: str) -> int:
    """The codebook index an image token's name encodes.

    The name is "IMGIMG", the index in decimal with each digit written as a
    letter (A=0 .. J=9), then one closing character, which is dropped: the
    rule of Chameleon's VocabTranslation.bpe2img and transformers'
    ChameleonImageVocabularyMapping.bpe2img ("IMGIMGBCZ" -> 12).
    """
    if not name.startswith(IMAGE_TOKEN_PREFIX):
        raise ValueError(f"{name!r} is not an image token (no {IMAGE_TOKEN_PREFIX!r} prefix)")
    digits = name[len(IMAGE_TOKEN_PREFIX) : -1].translate(_LETTERS_TO_DIGITS)
    if not digits or not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"image token {name!r} does not spell a number in letters A-J")
    return int(digits)


class BPEToCodebook:
    """Maps the language model's image-token ids to VQGAN codebook indices.

    Lumina-mGPT's vocabulary, for one, holds 8192 image tokens at BPE ids
    4..8195; which code each id stands for is read from its name.
    """

    def __init__(self, bpe_ids: Sequence[int], codes: Sequence[int]) -> None:
        bpe = torch.as_tensor(list(bpe_ids), dtype=torch.long)
        code = torch.as_tensor(list(codes), dtype=torch.long)
        if bpe.numel() == 0 or bpe.shape != code.shape:
            raise ValueError("need one codebook index per image-token id, and at least one")
        if int(bpe.min()) < 0 or int(code.min()) < 0:
            raise ValueError("BPE ids and codebook indices must be non-negative")
        if bpe.unique().numel() != bpe.numel():
            raise ValueError("an image-token id appears twice")
        if code.unique().numel() != code.numel():
            raise ValueError("two image tokens name the same codebook index")
        # Dense table over 0..max id; -1 marks ids that are not image tokens.
        self._lookup = torch.full((int(bpe.max()) + 1,), -1, dtype=torch.long)
        self._lookup[bpe] = code
        self._inverse = torch.full((int(code.max()) + 1,), -1, dtype=torch.long)
        self._inverse[code] = bpe
        self._per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_vocab(
        cls, vocab: Mapping[str, int], num_embeddings: int | None = None
    ) -> BPEToCodebook:
        """From a token-name -> id vocabulary (tokenizer.json's model.vocab, or
        `tokenizer.get_vocab()`). With `num_embeddings`, the image tokens must
        name every code 0..num_embeddings-1 exactly once."""
        return cls.from_token_names(
            vocab, IMAGE_TOKEN_PREFIX, image_token_code, num_embeddings, kind="image"
        )

    @classmethod
    def from_token_names(
        cls,
        vocab: Mapping[str, int],
        prefix: str,
        code_of: Callable[[str], int],
        num_codes: int | None = None,
        *,
        kind: str,
    ) -> BPEToCodebook:
        """The table for every token whose name starts with `prefix`, its code
        read by `code_of(name)`. With `num_codes`, the tokens must name every
        code 0..num_codes-1 exactly once (a vocabulary paired with the wrong VQ
        model fails here)."""
        pairs = sorted(
            (int(token_id), code_of(name))
            for name, token_id in vocab.items()
            if name.startswith(prefix)
        )
        if not pairs:
            raise ValueError(f"the vocabulary has no {kind} tokens (names starting {prefix!r})")
        if num_codes is not None:
            found = sorted(p[1] for p in pairs)
            if found != list(range(num_codes)):
                raise ValueError(
                    f"the vocabulary's {len(pairs)} {kind} tokens name codes "
                    f"{found[0]}..{found[-1]}, not each of 0..{num_codes - 1} once "
                    "(wrong pairing of vocabulary and VQ model?)"
                )
        return cls([p[0] for p in pairs], [p[1] for p in pairs])

    @property
    def image_token_ids(self) -> torch.Tensor:
        """Sorted BPE ids of the image tokens, [N] int64."""
        return (self._lookup >= 0).nonzero().squeeze(1)

    @property
    def num_codes(self) -> int:
        return int((self._lookup >= 0).sum())

    def __call__(self, bpe_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Codebook indices for image-token ids, same shape, int64, same device.

        Raises ValueError if any id is not an image token (text, special or
        Lumina-mGPT's end-of-line tokens must be removed first)."""
        return self._translate(bpe_ids, forward=True)

    def to_bpe(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The inverse: image-token ids for codebook indices."""
        return self._translate(codes, forward=False)

    def _translate(self, values: torch.Tensor | Sequence[int], forward: bool) -> torch.Tensor:
        values = torch.as_tensor(values)
        if not is_integer(values):
            raise TypeError(f"expected integer ids, got {values.dtype}")
        values = values.long()
        table = self._tables(values.device)[0 if forward else 1]
        # Out-of-table ids look up a -1 through the clamp, then fail below.
        inside = (values >= 0) & (values < table.numel())
        out = torch.where(inside, table[values.clamp(0, table.numel() - 1)], -1)
        bad = out < 0
        if bool(bad.any()):
            wrong = [str(v) for v in values[bad].unique().tolist()]
            what = "image-token ids" if forward else "codebook indices of this vocabulary"
            raise ValueError(f"{len(wrong)} value(s) are not {what}: {listing(wrong)}")
        return out

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._per_device:
            self._per_device[device] = (self._lookup.to(device), self._inverse.to(device))
        return self._per_device[device]
