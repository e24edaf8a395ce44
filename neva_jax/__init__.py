"""neva-jax."""
