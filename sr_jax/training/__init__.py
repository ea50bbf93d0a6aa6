"""Training pieces: mesh and sharding rules, optimizer, steps, checkpoints, evaluation, the trainer."""
