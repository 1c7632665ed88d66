"""Train the bundled demo model: a VQ tokenizer and a Lumina-mGPT-format
Chameleon on procedurally drawn captioned scenes (vllm_sjd/demo/scenes.py).

One command, on CPU, time-budgeted:

    .venv/bin/python scripts/train_demo_model.py --seed 0

(or `python -m vllm_sjd.demo.training`, the same flags).

Phases (each stops at its step count or its share of the wall-clock budget,
whichever comes first; the counts actually run are written to the report):

1. Render the scenes (64x64 px; a held-out set from seed + 1).
2. VQ tokenizer, 4x downsampling, 512 codes of 8 dims: transformers'
   ChameleonVQVAE encoder (+ quant_conv) and our Chameleon VQGAN decoder
   (vllm_sjd/vq/chameleon_vqgan.py), both built small from one
   ChameleonVQVAEConfig. A plain autoencoder warm-up, a k-means initialised
   codebook, then EMA codebook updates with dead-code restarts; 32 px crops
   first (4x cheaper, the nets are fully convolutional), then full images.
   Loss: L1 + MSE weighted towards coloured pixels, plus an edge term (the
   images' finite differences), commitment 0.25.
3. Encode every scene to a 16x16 code grid.
4. The language model: ChameleonConfig (Lumina-mGPT's
   ChameleonXLLMXForConditionalGeneration), 6 layers. A sequence
   is the tokenized Lumina prompt "Generate an image of 64x64 according to
   the following prompt:\\n{caption}<reserved08706>", the image header
   (image start, height, width tokens), 16 rows of 16 codes each closed by
   end-of-line, end of image. 10% of sequences are unconditional (the header
   and the image only, for classifier-free guidance). Loss on the image part
   only (codes, end-of-line, end of image): a softmax over those ids at every
   position plus a full-vocabulary softmax at 32 sampled positions per
   sequence, which keeps every unused id improbable at a fraction of the
   cost. The image tokens of code cells that hold part of an object (any
   coloured pixel; about 13% of cells) weigh 4 times the others in the
   per-position softmax (--lm-object-weight): they carry what the caption
   says, and the shipped run with the weight matched captions better than
   the one without (benchmarks/RESULTS.md). A linear probe, used in training
   only and not saved, reads from every position that predicts a code the
   shape and colour of the object covering that cell (in sequences with a
   caption) and the cell's row and column (--lm-aux-weight 0.5 on its
   loss): without it the image positions never read the caption's shape
   word (benchmarks/caption_discrimination.py) and the shapes came out at
   chance; with it they follow the caption (benchmarks/RESULTS.md, "The
   auxiliary probe").
   Width 256 by default (--lm-width, heads of 64 channels, MLP 3x the
   width). Constant learning rate after warm-up, or a linear decay to 0 at
   the step the clock allows (--lm-lr-decay, estimated from the measured step
   rate) or at --lm-decay-steps; the saved weights are an
   exponential moving average, so a run cut short by the budget is the run
   with that step count.

5. Decoder polish: the VQ decoder alone on the frozen codes, its loss weighted
   towards coloured pixels (objects), so that hues survive decoding.

Outputs (vllm_sjd/demo/model/ by default): config.json, generation_config.json
(the served default temperature, 0.8), model.safetensors
(bf16, the encoder as model.vqmodel.*), tokenizer files,
vq/decoder.safetensors (fp32; vLLM loads every top-level *.safetensors),
train_report.json.

Same seed + same step counts (--vq-warmup-steps ... --lm-steps, with
--budget-min 0 to turn the clock off; the report's "reproduce" line) gives
the same checkpoint bytes on the same machine and thread count
(tests/test_demo_training.py). The language model's loss runs under
torch.compile with deterministic algorithms and no compile cache: without
them two runs differed in the last bits of 8 of 148 tensors after 3 steps,
the embeddings among them (likely source: inductor's accumulating index_put,
the embedding backward, which adds across threads in a varying order unless
deterministic algorithms are on); with them the runs were identical.

Modules: design (sizes, vocabulary, configs, token sequences), images
(scenes, rendering), clock (the budget, the log), vq (phases 2, 3 and 5),
lm_batches (the language model's batches, loss weights, probe labels), lm
(phase 4), saving (checkpoint, tokenizer, report), cli (flags, the phases in
order).
"""
