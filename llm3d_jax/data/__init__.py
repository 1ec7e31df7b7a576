"""Input pipeline: TFDS (ArrayRecord) -> grain -> global jax.Arrays. (entry points being written)"""
