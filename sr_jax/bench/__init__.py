"""Throughput benchmarks of the train step (`python -m train.bench`): a synthetic world of any size, the
timing harness, and the PyTorch reference of the same network."""
