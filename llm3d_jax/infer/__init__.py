"""Inference: KV-cached decoding loops, batched jit-compiled generation, exported-model loading."""
