"""Data: the on-disk dataset store, the embedded synthetic dataset and the batch pipeline."""
