"""XLA flags the suite compiles with: the tests' programs are tiny, so compiling them is
most of the suite's CPU, and these two flags cut the compile time by about a third.

- `--xla_backend_optimization_level=0`: LLVM at -O0.
- `--xla_cpu_use_fusion_emitters=false`: XLA:CPU's elemental emitters instead of its
  MLIR fusion emitters.

Neither changes what the tests check: on the tiny model, one forward and backward pass
(logits, loss and every gradient) under each flag equals the default build to within 5e-7
relative (float32 rounding). Users' runs, the benchmarks and `launch/gpu_bench.sh` keep
XLA's defaults. tests/conftest.py adds them to XLA_FLAGS, which the tests' subprocesses
inherit; the tests that write their own XLA_FLAGS add them too. Importable as
`compile_flags` (pyproject's pytest `pythonpath` holds tests/).
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
