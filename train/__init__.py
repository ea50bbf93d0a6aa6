"""Command-line entry points (`python -m train.NAME`), thin wrappers over the library:

pretrain      pretrain the foundation model (resumable)
finetune      fine-tune a pretrained run for a cold-start protocol
evaluate      re-evaluate a run's checkpoint on a split
cold_start    the cold-start comparison grid -> docs/COLD_START.md's tables
experiment    the results grid (models x datasets x seeds) -> docs/RESULTS.md
tune          an equal tuning budget per model, on validation (Optuna) -> configs/tuned/
prepare       convert a dataset into the store (your tables, MovieLens, Amazon) and build its text cache
encode_text   fill a dataset's text cache with an encoder (resumable)
convert       checkpoint utilities: Hugging Face encoder -> orbax, inspect a checkpoint
export_tfds   a store dataset as tensorflow-datasets array_record files
bench         train-step throughput against the PyTorch reference
bench_input   input-pipeline throughput
bench_text    text-encoder throughput
"""
