"""Evaluation: generation with a KV cache and answer scorers.

- `neva_jax.eval.generate`: `generate_tokens` (batched prefill + jitted decode loop
  over a preallocated KV cache) and `Generator` (prompt templates, images, stop
  strings, text in and out).
- `neva_jax.eval.sampling`: greedy / temperature / top-k / top-p / repetition penalty.
- `neva_jax.eval.evaluate`: exact match, VQAv2 accuracy, POPE, multiple choice,
  held-out loss and perplexity.
- `neva_jax.eval.score`: log P(answer | prompt, image) and whether greedy decoding
  gives it (multiple-choice scoring).
- `neva_jax.eval.lmms`: lmms-eval's in-process model class (`--model neva_jax`; imports
  lmms-eval, so only lmms-eval loads it).

The command line is `python -m neva_jax.generate`.
"""
