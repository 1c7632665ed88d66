"""LlamaGen-T2I checkpoints (LlamaGen's .pt format) load into vLLM and compute
LlamaGen's logits: against a plain-PyTorch forward of the same weights with
LlamaGen's 120-slot, left-padded, masked caption."""

import argparse
import json
import math

import pytest
import torch
from vllm import SamplingParams

from tests.conftest import assert_vllm_logits_match, make_llm, shutdown
from vllm_sjd.testing.tiny_llamagen import (
    CHECKPOINT_NAME,
    CODEBOOK,
    IMAGE_SIZE,
    TINY,
    build_tiny_llamagen,
    build_tiny_t5,
    load_state,
    reference_greedy,
    reference_logits,
    tiny_config,
)
from vllm_sjd.checkpoints import CheckpointError
from vllm_sjd.layouts.llamagen import LlamaGenImageLayout
from vllm_sjd.models.llamagen import apply_rotary, mrope_positions, rotary_table_2d
from vllm_sjd.models.llamagen_checkpoint import (
    check_state_dict,
    checkpoint_entries,
    read_state_dict,
    write_model_dir,
)

IMAGE_TOKENS = [5, 300, 17, 42, CODEBOOK - 1, 0, 99, 123, 7, 8, 9, 200]
CAPTIONS = ["a red circle on black background", "a blue square"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llamagen(tmp_path_factory.mktemp("llamagen"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5"))


def padded(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.nn.functional.pad(logits, (0, vocab_size - logits.shape[-1]), value=-math.inf)


# --------------------------------------------------------------------------
# Engine: logits and greedy tokens against LlamaGen's formulation
# --------------------------------------------------------------------------


@pytest.mark.engine
def test_logits_match_llamagen_on_the_null_caption(model_dir):
    """The .pt as LlamaGen's trainer saves it (weights under "model", optimizer
    state, the args Namespace) loads with weights_only; a 7-slot null caption
    plus image codes gives LlamaGen's logits at every position."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        saved = torch.load(model_dir / CHECKPOINT_NAME, weights_only=True)
    assert set(saved) == {"model", "optimizer", "steps", "args"}
    assert "layers.0.attention.wqkv.weight" in saved["model"]
    assert "cls_embedding.uncond_embedding" in saved["model"]

    config = tiny_config()
    layout = LlamaGenImageLayout.from_config(config)
    nulls = layout.unconditional_prompt_token_ids(caption_length=7)
    expected = reference_logits(config, load_state(model_dir), None, IMAGE_TOKENS, caption_length=7)
    # Null ids score -inf (never generated): the padded reference says so too.
    assert_vllm_logits_match(model_dir, nulls + IMAGE_TOKENS, padded(expected, config.vocab_size))


@pytest.mark.engine
def test_caption_embeddings_give_llamagens_greedy_image(model_dir, t5_dir, tmp_path):
    """Conditional prompts through vLLM's prompt embeddings (T5 rows projected
    by the checkpoint's caption embedder) and their null-caption partners give
    the greedy tokens of LlamaGen's masked, left-padded 120-slot caption; the
    folder is the safetensors conversion of the .pt."""
    from vllm_sjd.llamagen_text import LlamaGenTextEncoder

    converted = write_model_dir(
        model_dir / CHECKPOINT_NAME, tmp_path / "converted",
        gpt_model="GPT-B", image_size=IMAGE_SIZE, **TINY,
    )
    assert (converted / "model.safetensors").exists()
    config, state = tiny_config(), load_state(model_dir)
    encoder = LlamaGenTextEncoder(t5_dir, converted)
    features = encoder.caption_features(CAPTIONS)
    assert [f.shape[0] for f in features] == [7, 4]  # words + </s>
    prompts = encoder.prompts(CAPTIONS)
    unconditional = encoder.unconditional_prompt_token_ids(prompts[0])
    n = 24
    expected = [reference_greedy(config, state, f, n) for f in features]
    expected.append(reference_greedy(config, state, None, n, caption_length=7))

    llm = make_llm(converted, skip_tokenizer_init=True, enable_prompt_embeds=True)
    try:
        outputs = llm.generate(
            prompts + [{"prompt_token_ids": unconditional}],
            SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        shutdown(llm)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    assert len({tuple(e) for e in expected}) == 3  # the captions matter


@pytest.mark.engine
def test_tensor_parallel_2_gives_the_reference_greedy_tokens(model_dir, t5_dir):
    from vllm_sjd.llamagen_text import LlamaGenTextEncoder

    encoder = LlamaGenTextEncoder(t5_dir, model_dir)
    features = encoder.caption_features(CAPTIONS[:1])[0]
    expected = reference_greedy(tiny_config(), load_state(model_dir), features, 16)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        llm = make_llm(model_dir, skip_tokenizer_init=True, enable_prompt_embeds=True,
                       tensor_parallel_size=2)
    try:
        output = llm.generate(
            encoder.prompts(CAPTIONS[:1]),
            SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
            use_tqdm=False,
        )[0]
    finally:
        shutdown(llm)
    assert list(output.outputs[0].token_ids) == expected


# --------------------------------------------------------------------------
# Engine-free: rotary table, positions, checkpoint handling
# --------------------------------------------------------------------------


def test_rotary_table_zeroes_the_caption_and_walks_the_grid():
    grid, head_dim, cls = 4, 32, 120
    table = rotary_table_2d(grid, head_dim, 10000.0, cls)
    assert table.shape == (cls + grid * grid, head_dim // 2, 2) and table.dtype == torch.float32
    assert not table[:cls].any()  # LlamaGen's zero rows, not the identity
    inv = 10000.0 ** (-torch.arange(head_dim // 4).double() * 4 / head_dim)
    r, c = 2, 3
    angles = torch.cat([r * inv, c * inv]).float()
    torch.testing.assert_close(table[cls + r * grid + c, :, 0], angles.cos())
    torch.testing.assert_close(table[cls + r * grid + c, :, 1], angles.sin())
    # Rotating interleaved pairs is multiplying by e^{i angle}.
    x = torch.randn(1, 2, head_dim)  # [tokens, heads, head_dim]
    cos, sin = table[cls + 7 : cls + 8, :, 0], table[cls + 7 : cls + 8, :, 1]
    turned = torch.view_as_complex(x.reshape(1, 2, -1, 2)) * torch.complex(cos, sin)[:, None]
    torch.testing.assert_close(apply_rotary(x, cos, sin), torch.view_as_real(turned).flatten(-2))
    assert not apply_rotary(x, table[:1, :, 0], table[:1, :, 1]).any()  # caption: q = k = 0


def test_positions_put_the_image_at_slot_120_whatever_the_caption_length():
    cls = 120
    # An embeddings prompt reaches the model as 0..L-1: all caption.
    positions, delta = mrope_positions(range(9), CODEBOOK, cls)
    assert positions.shape == (3, 9) and delta == cls - 9
    assert positions[0].tolist() == list(range(111, 120)) and (positions == positions[0]).all()
    # Null ids, then image codes: the codes continue at 120.
    null = [CODEBOOK + s for s in range(117, 120)]
    positions, delta = mrope_positions(null + [4, 5], CODEBOOK, cls)
    assert positions[0].tolist() == [117, 118, 119, 120, 121] and delta == 117
    # A too-long caption still starts the image at 120 (caption rows clamp at 0).
    positions, delta = mrope_positions(range(125), CODEBOOK, cls)
    assert delta == -5 and positions[0, 0] == 0 and positions[0, -1] == 119


def test_checkpoint_entries_unwrap_the_training_checkpoint():
    w = torch.ones(2)
    entries = dict(checkpoint_entries([
        ("model", {"_orig_mod.norm.weight": w, "freqs_cis": w, "tok_embeddings.weight": w}),
        ("optimizer", {"state": {}}),
        ("steps", 5),
        ("args", argparse.Namespace(x=1)),
    ]))
    assert set(entries) == {"norm.weight", "tok_embeddings.weight"}
    flat = dict(checkpoint_entries([("module.norm.weight", w), ("steps", 3)]))
    assert set(flat) == {"norm.weight"}


class _NotAllowed:
    pass


def test_reading_refuses_pickled_objects(tmp_path):
    torch.save({"model": {"norm.weight": torch.ones(2)}, "extra": _NotAllowed()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(tmp_path / "bad.pt")
    torch.save({"module": {"norm.weight": torch.ones(2)}, "args": argparse.Namespace(a=1)},
               tmp_path / "ok.pt")
    assert set(read_state_dict(tmp_path / "ok.pt")) == {"norm.weight"}
    with pytest.raises(CheckpointError, match="missing cls_embedding"):
        read_state_dict(tmp_path / "ok.pt", ["cls_embedding.cap_proj.fc1.weight"])


def test_state_dict_checks_name_the_problem(model_dir):
    config, state = tiny_config(), load_state(model_dir)
    check_state_dict(state, config)
    with pytest.raises(CheckpointError, match="class-conditional"):
        check_state_dict({**state, "cls_embedding.embedding_table.weight": torch.ones(1)}, config)
    broken = dict(state)
    del broken["layers.1.feed_forward.w3.weight"]
    broken["layers.0.attention.wo.weight"] = torch.ones(3, 3)
    with pytest.raises(CheckpointError, match="missing: layers.1.feed_forward.w3.weight"
                       ".*shape mismatch: layers.0.attention.wo.weight"):
        check_state_dict(broken, config)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        check_state_dict(state, tiny_config(image_size=256, hidden_size=128))


def test_write_model_dir_links_or_converts(model_dir, tmp_path):
    source = model_dir / CHECKPOINT_NAME
    with pytest.raises(ValueError, match="give image_size"):
        write_model_dir(source, tmp_path / "x", gpt_model="GPT-B", **TINY)
    linked = write_model_dir(source, tmp_path / "linked", gpt_model="GPT-B",
                             image_size=IMAGE_SIZE, safetensors=False, **TINY)
    assert (linked / CHECKPOINT_NAME).is_symlink()
    saved = json.loads((linked / "config.json").read_text())
    assert saved["architectures"] == ["LlamaGenT2IForCausalLM"]
    assert saved["model_type"] == "llamagen_t2i" and saved["vocab_size"] == CODEBOOK + 120
    assert saved["rope_parameters"]["mrope_section"] == [8, 8]
    state = read_state_dict(linked)
    torch.testing.assert_close(state["norm.weight"], load_state(model_dir)["norm.weight"])
    # A checkpoint of another size is refused before anything is written.
    with pytest.raises(CheckpointError, match="shape mismatch"):
        write_model_dir(source, tmp_path / "wrong", gpt_model="GPT-B", image_size=IMAGE_SIZE)
    assert not (tmp_path / "wrong").exists()
