"""Command-line entry points: `python -m train.pretrain`, `python -m train.evaluate`, `python -m train.bench_input`."""
