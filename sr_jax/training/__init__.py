"""Training: a run's spec, program, loop, state restore, records and evaluation; `trainer.fit` joins them."""
