"""Random model inputs for the grounding tests (test_target_tokens, test_object_roles)."""

import numpy as np

from llm3d_jax.model import llm3d


def random_inputs(config, batch=2, points=16, seed=0):
    """`llm3d.example_inputs` shapes (prompt 5, answer 7) with random features, voxels and
    prompt ids."""
    rng = np.random.default_rng(seed)
    inputs = llm3d.example_inputs(config, batch=batch, points=points, prompt_len=5, answer_len=7)
    return {
        **inputs,
        "features": rng.normal(size=inputs["features"].shape).astype(np.float32),
        "voxels": rng.integers(0, 256, inputs["voxels"].shape).astype(np.int32),
        "prompt_ids": rng.integers(2, 500, inputs["prompt_ids"].shape).astype(np.int32),
    }
