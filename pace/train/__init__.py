"""Trainer, checkpoints, optimiser and scheduler builders, logging."""
