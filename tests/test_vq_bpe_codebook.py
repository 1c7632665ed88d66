"""Engine-free tests of image-token ids -> codebook indices (vllm_sjd/vq/bpe_codebook.py)."""

import pytest
import torch

from vllm_sjd.testing.tiny_vqgan import tiny_decoder
from vllm_sjd.vq.bpe_codebook import BPEToCodebook, image_token_code

# --------------------------------------------------------------------------
# BPE ids -> codebook indices
# --------------------------------------------------------------------------


def image_token_name(code: int, width: int = 0) -> str:
    """Chameleon's naming: digits as letters A=0..J=9, then a closing 'Z'."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code).zfill(width)) + "Z"


def lumina_like_vocab(num_codes: int, permutation: list[int] | None = None, width: int = 0) -> dict:
    """Special tokens at 0..3, image tokens at BPE ids 4..4+num_codes-1 (as in
    Lumina-mGPT), then text and the reserved tokens."""
    codes = permutation or list(range(num_codes))
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<reserved0000>": 3}
    vocab.update({image_token_name(code, width): 4 + i for i, code in enumerate(codes)})
    first_text = 4 + num_codes
    vocab.update({"a": first_text, "IMG": first_text + 1, "<racm3:break>": first_text + 2})
    return vocab


def test_image_token_code():
    assert image_token_code("IMGIMGAZ") == 0
    assert image_token_code("IMGIMGBCZ") == 12
    assert image_token_code("IMGIMGIBJBZ") == 8191
    assert image_token_code("IMGIMGAABCZ") == 12  # zero-padded spelling
    for bad in ("IMGIMGZ", "IMGIMGXYZ", "IMGIMGB-Z", "IMGIMG", "IMGBCZ"):
        with pytest.raises(ValueError):
            image_token_code(bad)


def test_bpe_mapping_lumina_layout():
    vocab = lumina_like_vocab(8192)
    mapping = BPEToCodebook.from_vocab(vocab, num_embeddings=8192)
    assert mapping.num_codes == 8192
    assert torch.equal(mapping.image_token_ids, torch.arange(4, 8196))
    ids = torch.tensor([[4, 5], [8195, 4 + 1234]])
    codes = mapping(ids)
    assert codes.dtype == torch.int64 and torch.equal(codes, torch.tensor([[0, 1], [8191, 1234]]))
    assert torch.equal(mapping.to_bpe(codes), ids)
    assert mapping([4, 6]).tolist() == [0, 2]


@pytest.mark.parametrize("width", [0, 3])
def test_bpe_mapping_follows_names_and_agrees_with_transformers(width):
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    # Codes deliberately out of id order: the name, not the position, decides.
    permutation = [7, 3, 0, 11, 5, 1, 10, 2, 9, 4, 8, 6]
    vocab = lumina_like_vocab(12, permutation, width)
    mapping = BPEToCodebook.from_vocab(vocab, num_embeddings=12)
    reference = ChameleonImageVocabularyMapping(vocab).bpe2img
    ids = sorted(reference)
    assert mapping(ids).tolist() == [reference[i] for i in ids]
    assert mapping(torch.tensor(ids)).tolist() == permutation


def test_bpe_mapping_errors():
    mapping = BPEToCodebook.from_vocab(lumina_like_vocab(16))
    text_id = lumina_like_vocab(16)["a"]
    for bad in ([4, 0], [text_id], [100000], [-1]):
        with pytest.raises(ValueError, match="not image-token ids"):
            mapping(torch.tensor(bad))
    with pytest.raises(TypeError):
        mapping(torch.tensor([4.0]))
    with pytest.raises(ValueError, match="not codebook indices"):
        mapping.to_bpe([16])

    with pytest.raises(ValueError, match="no image tokens"):
        BPEToCodebook.from_vocab({"a": 0, "b": 1})
    with pytest.raises(ValueError, match="not each of 0..31"):
        BPEToCodebook.from_vocab(lumina_like_vocab(16), num_embeddings=32)
    duplicate = {image_token_name(3): 4, image_token_name(3, width=2): 5}
    with pytest.raises(ValueError, match="same codebook index"):
        BPEToCodebook.from_vocab(duplicate)


def test_bpe_ids_to_pixels():
    model = tiny_decoder()
    mapping = BPEToCodebook.from_vocab(lumina_like_vocab(16), num_embeddings=16)
    bpe = torch.arange(4, 20).view(1, 4, 4)
    out = model.decode(mapping(bpe))
    assert out.shape == (1, 3, 8, 8)
    assert torch.equal(out, model.decode(torch.arange(16).view(1, 4, 4)))
