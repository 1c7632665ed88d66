"""Helpers the tests and the benchmarks share: tiny random checkpoints of each
family's real architecture, written to a folder and served by the real engine.

Never used at serve time; they need the `test` extra (transformers' reference
models, tokenizers, safetensors).
"""
