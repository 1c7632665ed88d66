"""A word-level tokenizer in transformers' format, for the toy checkpoints.

The bundled demo model and the tests' tiny checkpoints spell every token as
one whitespace-separated word; this builds and saves that tokenizer once.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path


def save_word_level_tokenizer(
    path: Path,
    vocab: Mapping[str, int],
    *,
    unk_token: str,
    special_tokens: Mapping[str, str] | None = None,
    additional_special_tokens: Sequence[str] = (),
    append_eos: str | None = None,
    prepend_bos: str | None = None,
):
    """Save a PreTrainedTokenizerFast to `path`, and return it.

    vocab: word -> id. special_tokens: transformers' names -> word (bos_token,
    eos_token, pad_token). append_eos: a word (with its id in vocab) appended
    to every encoded text, as T5's tokenizer does with </s>. prepend_bos: a word
    put before every encoded text, as Llama's tokenizer does with its BOS.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab=dict(vocab), unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if append_eos is not None or prepend_bos is not None:
        ends = [w for w in (prepend_bos, append_eos) if w is not None]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(([prepend_bos] if prepend_bos else []) + ["$A"]
                            + ([append_eos] if append_eos else [])),
            special_tokens=[(w, vocab[w]) for w in ends],
        )
    extra = {"additional_special_tokens": list(additional_special_tokens)} if additional_special_tokens else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=unk_token, **dict(special_tokens or {}), **extra
    )
    fast.save_pretrained(path)
    return fast
