"""Benchmarks: neva-jax against Hugging Face `transformers` (PyTorch), side by side.

`python -m neva_jax.bench [train|decode|compile|util|packing|all]` runs, in ONE
process and on the same CPU threads, both our code (the project's importer, pure
train step and KV-cache generation) and `transformers`' `LlavaForConditionalGeneration`
from identical weights, and prints one JSON line per measurement and a final
table with every target (`met` yes/NO). Every side-by-side figure is repeated
(`--repeats`, interleaved) and printed as median, min, max and spread; ratios and
targets use the medians. Both sides share the process and so its allocator
(`neva_jax.allocator`, named in the output). Nothing asserts a time: tests only
run the code paths (tests/bench).

- `train`: the stage-2 and stage-1 train step (fp32, AdamW, clip 1.0, frozen vision
  tower; stage 1 also freezes the LLM and its LM head), median after warm-up,
  tokens/s and the ratio of medians, compile time apart (`train_bench`).
- `util`: model FLOPs per step (`flops`, docs/REFERENCE.md "FLOP convention") / step time / the
  measured fp32 matmul peak in the same process (`train_bench.run_util`).
- `decode`: greedy, batch 1 and 8, 64 new tokens after an image prompt: decode
  tokens/s, end-to-end latency, time to first token, recompilations (`decode_bench`).
- `compile`: stage-2 step compile time at 4 and 32 layers, scan vs unrolled
  (`compile_bench`).
- `packing`: real-token throughput on the synthetic stage-2 data, packed vs padded
  (`packing_bench`).

Shapes live in `shapes` (`bench`, `tiny`, `llava_v15_7b`); the GPU harness for a
lent H200 is `gpu` (run by launch/gpu_bench.sh).
"""
