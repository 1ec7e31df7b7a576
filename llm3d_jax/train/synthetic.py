"""A learnable synthetic batch stream for smoke tests and benchmarks (no files needed).

Each example has a hidden class c: the point features lean towards feature direction c and the
answer spells c with location tokens (ids from `answer_offset`, the rows that train even when
the LLM is frozen); so the answer can only be predicted by reading the 3D features through the
Q-Former, and the loss falls when the trainable parts learn. Batches depend only on
(seed, index), so the stream's checkpoint state is one integer, and every process builds the
same global batch and keeps its own shards (multi-host safe).
"""

from __future__ import annotations

import jax
import numpy as np


class SyntheticBatches:
    """Iterator of global batches (dicts of sharded jax.Arrays, keys of `step.MODEL_INPUTS`)."""

    def __init__(
        self,
        *,
        batch_size: int,
        num_points: int,
        feature_dim: int,
        prompt_len: int,
        answer_len: int,
        vocab_size: int,
        answer_offset: int,
        seed: int,
        sharding: jax.sharding.Sharding,
        num_classes: int = 8,
    ):
        self.shapes = dict(
            batch_size=batch_size,
            num_points=num_points,
            feature_dim=feature_dim,
            prompt_len=prompt_len,
            answer_len=answer_len,
        )
        self.vocab_size = vocab_size  # prompt ids are drawn from [2, vocab_size)
        self.answer_offset = answer_offset
        self.num_classes = min(num_classes, feature_dim)
        self.seed = seed
        self.sharding = sharding
        self.index = 0

    def host_batch(self, index: int) -> dict[str, np.ndarray]:
        b, n, d = (self.shapes[k] for k in ("batch_size", "num_points", "feature_dim"))
        lp, la = self.shapes["prompt_len"], self.shapes["answer_len"]
        rng = np.random.default_rng([self.seed, index])
        cls = rng.integers(0, self.num_classes, size=b)
        features = rng.normal(0.0, 0.3, size=(b, n, d)).astype(np.float32)
        features[np.arange(b), :, cls] += 1.0
        features /= np.linalg.norm(features, axis=-1, keepdims=True)
        num_valid = rng.integers(n // 2, n + 1, size=b)
        point_mask = np.arange(n)[None, :] < num_valid[:, None]
        features *= point_mask[..., None]
        prompt_len = rng.integers(1, lp + 1, size=b)
        answer_len = rng.integers(1, la + 1, size=b)
        answer_ids = np.repeat(cls[:, None], la, axis=1)
        answer_ids[:, 1::2] = (cls[:, None] + 1) % self.num_classes
        answer_ids += self.answer_offset
        answer_mask = np.arange(la)[None, :] < answer_len[:, None]
        return {
            "features": features,
            "voxels": rng.integers(0, 256, size=(b, n, 3)).astype(np.int32),
            "point_mask": point_mask,
            "prompt_ids": rng.integers(2, self.vocab_size, size=(b, lp)).astype(np.int32),
            "prompt_mask": np.arange(lp)[None, :] < prompt_len[:, None],
            "answer_ids": np.where(answer_mask, answer_ids, 0).astype(np.int32),
            "answer_mask": answer_mask,
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        host = self.host_batch(self.index)
        self.index += 1
        return {
            k: jax.make_array_from_callback(v.shape, self.sharding, lambda idx, v=v: v[idx])
            for k, v in host.items()
        }

    def get_state(self) -> dict:
        return {"index": self.index, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def reset(self) -> None:
        self.index = 0
