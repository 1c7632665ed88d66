"""LlamaGen-T2I's text conditioning: a prompt to the vLLM prompt of caption embeddings.

As LlamaGen's T5Embedder and sample_t2i.py do it: the caption is tokenized by
the FLAN-T5 tokenizer (120 tokens at most, with </s>, padded to 120 with an
attention mask), encoded by transformers' T5EncoderModel (flan-t5-xl, 2048
wide), and its valid rows (mask = 1) become the caption. LlamaGen then
left-pads to 120 rows and masks the padding out of attention; the vLLM model
takes the L valid rows alone, which is the same computation (see
vllm_sjd/models/llamagen.py). The rows are projected here by the checkpoint's
own caption embedder (cls_embedding.cap_proj: fc1, tanh-GELU, fc2), because
vLLM's prompt-embeddings input must be hidden_size wide; the result is the
prompt `{"prompt_embeds": [L, hidden_size]}` (engine option
enable_prompt_embeds=True).

Its classifier-free-guidance partner is token ids, embedded by the model:
`LlamaGenImageLayout.unconditional_prompt_token_ids(caption_length=L)`.

Text cleaning: LlamaGen's default runs PixArt's clean_caption (ftfy,
BeautifulSoup, URL and symbol stripping, then lower-case); this module applies
its plain branch, lower-case and strip, unless given another `preprocess`.
For ordinary prompts the two agree; prompts with URLs, HTML or unusual
punctuation may tokenize differently.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_sjd.models.llamagen_checkpoint import CAPTION_KEYS, read_state_dict
from vllm_sjd.layouts.llamagen import LlamaGenImageLayout
from vllm_sjd.models.llamagen_config import LlamaGenConfig, register_config


def plain_preprocess(text: str) -> str:
    """LlamaGen's T5Embedder without clean_caption: lower-case, stripped."""
    return text.lower().strip()


class LlamaGenTextEncoder:
    """FLAN-T5 encoder plus a LlamaGen checkpoint's caption embedder.

    t5_path: a local folder with the T5 encoder and its tokenizer (what
    LlamaGen's --t5-path/flan-t5-xl holds); never downloaded.
    model_path: the LlamaGen model folder served by vLLM (config.json plus
    .pt or .safetensors weights); only the caption embedder is read from it.
    """

    def __init__(
        self,
        t5_path: str | Path,
        model_path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        preprocess: Callable[[str], str] = plain_preprocess,
    ) -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        register_config()
        t5_path, model_path = Path(t5_path), Path(model_path)
        for path in (t5_path, model_path):
            if not path.is_dir():
                raise FileNotFoundError(f"{path}: no such folder")
        self.config = LlamaGenConfig.from_pretrained(model_path)
        self.layout = LlamaGenImageLayout.from_config(self.config)
        self.max_length = self.config.cls_token_num
        self.device = torch.device(device)
        self.dtype = dtype
        self.preprocess = preprocess
        self.tokenizer = AutoTokenizer.from_pretrained(t5_path, local_files_only=True)
        self.t5 = T5EncoderModel.from_pretrained(t5_path, local_files_only=True, dtype=dtype)
        self.t5 = self.t5.to(self.device).eval()
        if self.t5.config.d_model != self.config.caption_dim:
            raise ValueError(
                f"the T5 encoder at {t5_path} is {self.t5.config.d_model} wide; the LlamaGen "
                f"checkpoint expects captions of {self.config.caption_dim} (flan-t5-xl: 2048)"
            )
        weights = read_state_dict(model_path, CAPTION_KEYS)
        self.fc1 = weights[CAPTION_KEYS[0]].to(self.device, dtype)  # [hidden, caption_dim]
        self.fc2 = weights[CAPTION_KEYS[1]].to(self.device, dtype)  # [hidden, hidden]

    @torch.no_grad()
    def caption_features(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """T5 rows of each caption's valid tokens: [L_i, caption_dim], L_i <= 120."""
        batch = self.tokenizer(
            [self.preprocess(t) for t in texts],
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        hidden = self.t5(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, 120, D]
        # Right-padded by the tokenizer: the valid rows are the first L.
        return [row[: int(m.sum())] for row, m in zip(hidden, mask)]

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The checkpoint's cap_proj: [L, caption_dim] -> [L, hidden_size]."""
        x = features.to(self.device, self.dtype)
        return F.linear(F.gelu(F.linear(x, self.fc1), approximate="tanh"), self.fc2)

    def prompts(self, texts: Sequence[str]) -> list[dict]:
        """vLLM prompts {"prompt_embeds": [L, hidden_size] float32 on CPU}, one per text."""
        return [
            {"prompt_embeds": self.project(rows).float().cpu()}
            for rows in self.caption_features(texts)
        ]

    def prompt(self, text: str) -> dict:
        return self.prompts([text])[0]

    def unconditional_prompt_token_ids(self, prompt: dict) -> list[int]:
        """The null-caption ids paired with a conditional prompt (same length)."""
        return self.layout.unconditional_prompt_token_ids(
            caption_length=int(prompt["prompt_embeds"].shape[0])
        )


def caption_prompt(encoder: LlamaGenTextEncoder, text: str) -> dict:
    """The conditional vLLM prompt of `text` (an EmbedsPrompt)."""
    return encoder.prompt(text)
