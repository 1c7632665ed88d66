"""Engine-free tests of the Emu3 image decoder (vllm_sjd/vq/emu3.py).

A tiny random-weight transformers Emu3VQVAE on CPU: four levels, so the real
8x spatial downsampling, and the real temporal factor 4, but 32-64 channels
(GroupNorm(32) needs multiples of 32) and a 64-code codebook. The vocabulary
is synthetic with Emu3's naming ("<|visual token 000012|>"), its ids shuffled
against the codes so that only a mapping read from the names passes.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Emu3ImageProcessor, Emu3VQVAE, Emu3VQVAEConfig
from transformers.models.emu3.modeling_emu3 import Emu3ImageVocabularyMapping

from vllm_sjd.checkpoints import CheckpointError
from vllm_sjd.vq.emu3 import Emu3ImageDecoder, visual_token_code

CODEBOOK = 64
TINY = dict(
    codebook_size=CODEBOOK,
    embed_dim=4,
    latent_channels=4,
    base_channels=32,
    channel_multiplier=[1, 1, 2, 2],  # 4 levels: 2 ** 3 = 8x, as Emu3's (1, 2, 2, 4)
    num_res_blocks=1,
    attn_resolutions=[3],  # attention at the lowest level, 64 channels wide
    hidden_size=64,  # the attention width: base_channels * channel_multiplier[-1]
    num_attention_heads=1,
    temporal_downsample_factor=4,
)

# Layout tokens as Emu3's tokenizer names them; visual tokens at ids 100..163.
EOL, EOF, EOI, BOI, IMG = 2, 3, 4, 5, 6
FIRST_VISUAL = 100
TEXT_VOCAB = {
    "hello": 0,
    "world": 1,
    "<|extra_200|>": EOL,
    "<|extra_201|>": EOF,
    "<|image end|>": EOI,
    "<|image start|>": BOI,
    "<|image token|>": IMG,
    "<image>": 7,
}
# Code c is the token at id FIRST_VISUAL + PERM[c].
PERM = torch.randperm(CODEBOOK, generator=torch.Generator().manual_seed(0))
VOCAB = {
    **TEXT_VOCAB,
    **{f"<|visual token {c:06d}|>": FIRST_VISUAL + int(PERM[c]) for c in range(CODEBOOK)},
}


def tiny_vq(seed: int = 0, **overrides) -> Emu3VQVAE:
    torch.manual_seed(seed)
    model = Emu3VQVAE(Emu3VQVAEConfig(**{**TINY, **overrides}))
    # Random norm affines and BatchNorm statistics too (defaults are 1/0), so
    # a weight or buffer lost in a round trip changes the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model.eval()


def tiny_decoder(seed: int = 0) -> Emu3ImageDecoder:
    return Emu3ImageDecoder.from_vq_model(tiny_vq(seed), VOCAB)


def random_codes(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CODEBOOK, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def decoder() -> Emu3ImageDecoder:
    return tiny_decoder()


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def test_downsample_factor_is_eight(decoder):
    assert decoder.downsample_factor == 8
    assert decoder.vq_model.spatial_scale_factor == 8
    # Emu3's default (the released tokenizer's) channel_multiplier gives the same.
    assert list(Emu3VQVAEConfig().channel_multiplier) == [1, 2, 2, 4]
    assert 2 ** (len(Emu3VQVAEConfig().channel_multiplier) - 1) == 8


def test_decode_shape_dtype_and_range(decoder):
    codes = random_codes(2, 3, 5)  # non-square on purpose
    pixels = decoder.decode(codes)
    assert pixels.shape == (2, 3, 24, 40)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    # The clamp is exercised: the raw output overshoots [-1, 1].
    with torch.no_grad():
        raw = decoder.vq_model.decode(codes)
    assert raw.abs().max() > 1.0
    torch.testing.assert_close(pixels, raw.clamp(-1, 1), rtol=0, atol=0)


def test_decode_is_frame_zero_of_the_temporal_decode(decoder):
    codes = random_codes(2, 3, 5)
    with torch.no_grad():
        # [B, T=1, h, w] -> [B, T * 4, 3, H, W]: one latent frame decodes to 4.
        video = decoder.vq_model.decode(codes.unsqueeze(1))
    assert video.shape == (2, 4, 3, 24, 40)
    torch.testing.assert_close(decoder.decode(codes), video[:, 0].clamp(-1, 1), rtol=0, atol=0)


def test_decode_is_deterministic_and_per_image(decoder):
    codes = random_codes(3, 2, 4)
    first = decoder.decode(codes)
    torch.testing.assert_close(decoder.decode(codes), first, rtol=0, atol=0)
    # Images in a batch do not interact (BatchNorm3d runs on its statistics).
    singles = torch.cat([decoder.decode(codes[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(singles, first, rtol=1e-5, atol=1e-5)
    # Different codes, different pixels.
    assert not torch.allclose(first[0], decoder.decode((codes[:1] + 1) % CODEBOOK)[0])


def test_decode_rejects_bad_codes(decoder):
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        decoder.decode(random_codes(3, 5))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        decoder.decode(random_codes(1, 1, 3, 5))  # a video grid
    with pytest.raises(TypeError, match="integers"):
        decoder.decode(random_codes(1, 3, 5).float())
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        decoder.decode(torch.full((1, 2, 2), CODEBOOK))
    with pytest.raises(ValueError, match="not yet mapped"):
        decoder.decode(torch.full((1, 2, 2), FIRST_VISUAL))  # a BPE id, not a code


# --------------------------------------------------------------------------
# Visual tokens -> codebook indices
# --------------------------------------------------------------------------


def test_visual_token_code():
    assert visual_token_code("<|visual token 000000|>") == 0
    assert visual_token_code("<|visual token 032767|>") == 32767
    for name in ("<|extra_200|>", "<|visual token|>", "<|visual token 00001x|>", "IMGIMGBAZ"):
        with pytest.raises(ValueError, match="not an Emu3 visual token"):
            visual_token_code(name)


def test_codes_from_tokens_reads_the_names(decoder):
    codes = random_codes(3, 5)
    bpe = FIRST_VISUAL + PERM[codes]  # [3, 5] visual-token ids
    out = decoder.codes_from_tokens(bpe)
    assert out.shape == (3, 5) and out.dtype == torch.int64
    assert torch.equal(out, codes)
    # Agrees with transformers' table for every visual token.
    reference = Emu3ImageVocabularyMapping(VOCAB).bpe2img
    ids = torch.tensor(sorted(reference))
    expected = torch.tensor([reference[int(i)] for i in ids])
    assert torch.equal(decoder.codes_from_tokens(ids), expected)


def test_codes_from_tokens_matches_decode_image_tokens_rows(decoder):
    """transformers' decode_image_tokens maps rows that still end in EOL
    (convert_bpe2img drops the last column); ImageGrid.codes drops it first."""
    codes = random_codes(3, 5, seed=4)
    rows = torch.cat([FIRST_VISUAL + PERM[codes], torch.full((3, 1), EOL)], dim=1)  # [3, 6]
    reference = Emu3ImageVocabularyMapping(VOCAB).convert_bpe2img(rows[None])[0]
    assert torch.equal(decoder.codes_from_tokens(rows[:, :-1]), reference.long())


def test_codes_from_tokens_rejects_non_visual_ids(decoder):
    bpe = FIRST_VISUAL + PERM[random_codes(2, 3)]
    bpe[0, 1] = EOL
    bpe[1, 2] = 9999  # past the vocabulary
    with pytest.raises(ValueError, match="visual-token ids only") as info:
        decoder.codes_from_tokens(bpe)
    assert f"{EOL}" in str(info.value) and "9999" in str(info.value)
    with pytest.raises(ValueError):  # the rows with their end-of-line column
        decoder.codes_from_tokens(torch.cat([bpe[:, :1], torch.full((2, 1), EOL)], dim=1))


def test_vocabulary_must_name_every_code_once():
    vq = tiny_vq()
    with pytest.raises(ValueError, match="no visual tokens"):
        Emu3ImageDecoder.from_vq_model(vq, TEXT_VOCAB)
    short = {k: v for k, v in VOCAB.items() if k != "<|visual token 000063|>"}
    with pytest.raises(ValueError, match="not each of"):
        Emu3ImageDecoder.from_vq_model(vq, short)
    # Emu3's full 32768-token vocabulary against a 64-code VQ model.
    big = {f"<|visual token {c:06d}|>": 1000 + c for c in range(32768)}
    with pytest.raises(ValueError, match="wrong pairing"):
        Emu3ImageDecoder.from_vq_model(vq, big)
    with pytest.raises(ValueError, match="not an Emu3 visual token"):
        Emu3ImageDecoder.from_vq_model(vq, {**VOCAB, "<|visual token x|>": 500})


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def test_save_and_from_pretrained_round_trip(decoder, tmp_path):
    decoder.vq_model.save_pretrained(tmp_path)
    loaded = Emu3ImageDecoder.from_pretrained(tmp_path, VOCAB)
    assert loaded.vq_model is not decoder.vq_model
    assert not loaded.vq_model.training
    codes = random_codes(2, 3, 5, seed=7)
    torch.testing.assert_close(loaded.decode(codes), decoder.decode(codes), rtol=0, atol=0)
    assert torch.equal(loaded.codes_from_tokens(FIRST_VISUAL + PERM[codes]), codes)


def test_from_pretrained_casts_dtype(decoder, tmp_path):
    decoder.vq_model.save_pretrained(tmp_path)
    loaded = Emu3ImageDecoder.from_pretrained(tmp_path, VOCAB, dtype=torch.bfloat16)
    assert loaded.vq_model.dtype == torch.bfloat16
    pixels = loaded.decode(random_codes(1, 2, 3))
    assert pixels.dtype == torch.float32 and pixels.shape == (1, 3, 16, 24)


def test_from_pretrained_refuses_missing_decoder_weights(decoder, tmp_path):
    decoder.vq_model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["decoder.conv_out.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="decoder.conv_out.weight"):
        Emu3ImageDecoder.from_pretrained(tmp_path, VOCAB)


def test_from_pretrained_needs_a_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        Emu3ImageDecoder.from_pretrained(tmp_path / "BAAI" / "Emu3-VisionTokenizer", VOCAB)


# --------------------------------------------------------------------------
# Pixels -> PIL
# --------------------------------------------------------------------------


def test_to_pil_sizes_and_mode(decoder):
    pixels = decoder.decode(random_codes(2, 3, 5))
    images = decoder.to_pil(pixels)
    assert len(images) == 2
    assert all(im.size == (40, 24) and im.mode == "RGB" for im in images)
    assert np.asarray(images[1]).shape == (24, 40, 3)
    ends = decoder.to_pil(torch.stack([torch.full((3, 1, 2), -1.0), torch.full((3, 1, 2), 1.0)]))
    assert np.asarray(ends[0]).max() == 0 and np.asarray(ends[1]).min() == 255


def test_to_pil_matches_emu3_postprocess(decoder):
    pixels = decoder.decode(random_codes(2, 3, 5, seed=3))
    processor = Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    reference = processor.postprocess(pixels, return_tensors="PIL.Image.Image")["pixel_values"]
    for ours, theirs in zip(decoder.to_pil(pixels), reference, strict=True):
        # Same truncation to uint8; float rounding may move a value by one.
        diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
        assert diff.max() <= 1


def test_decode_image_with_an_emu3_grid(decoder):
    from vllm_sjd.image_generation import decode_image
    from vllm_sjd.layouts.grid import ImageGrid

    # Emu3's rows: w visual tokens then <|extra_200|>; eof and eoi after the last.
    grid = ImageGrid(
        width=40, height=24, rows=3, cols=5, header=(BOI, IMG), row_end=EOL,
        trailer=(EOF, EOI), code_low=FIRST_VISUAL, code_high=FIRST_VISUAL + CODEBOOK,
    )
    codes = random_codes(3, 5, seed=9)
    rows = torch.cat([FIRST_VISUAL + PERM[codes], torch.full((3, 1), EOL)], dim=1)
    tokens = [BOI, IMG, *rows.flatten().tolist(), EOF, EOI]
    image = decode_image(tokens, grid, decoder.codes_from_tokens, decoder)
    assert image.size == (40, 24) and image.mode == "RGB"
    expected = decoder.to_pil(decoder.decode(codes[None]))[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
