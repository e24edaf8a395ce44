"""Conversion between Hugging Face checkpoints and neva-jax parameters."""
