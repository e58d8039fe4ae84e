"""Runnable examples; their model factories live inside deployq, so checkpoints may name them."""
