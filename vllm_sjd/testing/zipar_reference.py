"""ZipAR decoded greedily with transformers' Chameleon: the reference the engine must match.

Each pass feeds the whole stream so far (each token at its raster position,
causal over the stream) and takes the guided argmax of every target ZipAR
plans; the engine runs the same stream in pieces through its KV cache.
"""

import torch

from vllm_sjd.core.zipar import NO_TARGET, ZipARStream


def stream_logits(model, prompt, tokens, positions) -> torch.Tensor:
    """[1 + len(tokens), V] float64: row 0 after the prompt, row k + 1 after stream token k."""
    ids = list(prompt) + list(tokens)
    pos = list(range(len(prompt))) + [len(prompt) + p for p in positions]
    with torch.no_grad():
        hidden = model.model(
            input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos])
        ).last_hidden_state
        return model.lm_head(hidden)[0, len(prompt) - 1 :].to(torch.float64)


def greedy_zipar(model, prompt, unconditional, grid, window: int, scale: float,
                 max_feeds: int = 64) -> list[int]:
    """The image's tokens in raster order, guided (uncond + s * (cond - uncond)) when scale != 1."""
    stream = ZipARStream(grid, window, max_feeds)
    allowed = grid.allowed_mask(torch.arange(grid.num_tokens), model.lm_head.out_features)

    def draw(rows: list[tuple[int, int]]) -> None:
        tokens = stream.tokens_of(stream.stream)
        positions = [f.position for f in stream.stream]
        logits = stream_logits(model, prompt, tokens, positions)
        if scale != 1.0:
            uncond = stream_logits(model, unconditional, tokens, positions)
            logits = uncond + scale * (logits - uncond)
        for row, target in rows:
            if target < grid.num_tokens:
                masked = logits[row].masked_fill(~allowed[target], float("-inf"))
                stream.record(target, int(masked.argmax()))

    if stream.target_of(-1) != NO_TARGET:
        draw([(0, stream.target_of(-1))])
    last = grid.num_tokens - 1
    while not stream.known(last) or not any(f.position == last for f in stream.stream):
        start = len(stream.stream)
        feeds = stream.plan()
        draw([(start + k + 1, f.target) for k, f in enumerate(feeds) if f.target != NO_TARGET])
    return [stream.token(q) for q in range(grid.num_tokens)]
