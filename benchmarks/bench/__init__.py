"""The batch benchmark's parts (benchmarks/bench_batch.py is the command): common helpers, presets,
preparation, one module per variant, and the results files."""
