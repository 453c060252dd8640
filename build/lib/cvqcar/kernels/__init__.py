"""Pallas kernels, one file per op with its pure-jnp reference."""
