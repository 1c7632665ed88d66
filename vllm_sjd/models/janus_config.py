"""What the plugin reads and writes in a Janus-Pro config (transformers' JanusConfig)."""

ARCHITECTURE = "JanusForConditionalGeneration"
TEXT_VOCAB_FIELD = "sjd_text_vocab_size"


def text_vocab_size(text_config) -> int:
    """The text vocabulary's size, before the engine's was widened by the codes."""
    return getattr(text_config, TEXT_VOCAB_FIELD, text_config.vocab_size)


def widen_vocabulary(hf_config) -> None:
    """Text ids, then one id per image code (code c is text_vocab + c). Idempotent."""
    text = hf_config.text_config
    if getattr(text, TEXT_VOCAB_FIELD, None) is None:
        setattr(text, TEXT_VOCAB_FIELD, text.vocab_size)
        text.vocab_size = text.vocab_size + hf_config.vq_config.num_embeddings
