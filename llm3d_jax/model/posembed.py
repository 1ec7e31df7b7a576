"""Fixed sin/cos 3D position embedding of the point features (as in the released 3D-LLM).

Every point carries an integer voxel `(x, y, z)` on the scene's 256^3 grid. One 1D table of
`num_positions` rows x `C = D // 3` columns is shared by the three axes; the three looked-up rows
are concatenated (3C columns) and zero-padded to the feature width D (1408 -> 3 x 469 = 1407, the
last column stays zero). The table is the one of the `positional_encodings` package the original
imports: with C' = C rounded up to even and inv_freq_k = 1 / 10000^(2k / C'),
row p = [sin(p f_0), cos(p f_0), sin(p f_1), cos(p f_1), ...] cut to C columns.

Modes: `add` (features + scale * pe, scale 0.01 as released), `concat` ([features, pe], width 2D,
pe unscaled: a learnt projection follows, so no weighting is needed), `none` (features as given).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

MODES = ("add", "concat", "none")


@functools.lru_cache(maxsize=8)
def sincos_table(num_positions: int, channels: int) -> np.ndarray:
    """float32 [num_positions, channels]: interleaved sin/cos rows (see module doc)."""
    even = channels + channels % 2
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, even, 2, dtype=np.float32) / even))
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    table = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(num_positions, even)
    return np.ascontiguousarray(table[:, :channels], dtype=np.float32)


def position_embedding_3d(voxels: jnp.ndarray, dim: int, num_positions: int = 256) -> jnp.ndarray:
    """voxels int [..., 3] (0..num_positions-1, clipped) -> float32 [..., dim]."""
    channels = dim // 3
    table = jnp.asarray(sincos_table(num_positions, channels))
    axes = [
        jnp.take(table, voxels[..., i].astype(jnp.int32), axis=0, mode="clip") for i in range(3)
    ]
    pe = jnp.concatenate(axes, axis=-1)
    pad = [(0, 0)] * (pe.ndim - 1) + [(0, dim - 3 * channels)]
    return jnp.pad(pe, pad)


def output_dim(mode: str, feature_dim: int) -> int:
    """Width of what `PositionEmbedding3D` returns (the Q-Former's encoder width)."""
    return 2 * feature_dim if mode == "concat" else feature_dim


class PositionEmbedding3D(nn.Module):
    """features float [B,N,D], voxels int [B,N,3] -> float32 [B,N,D] (`concat`: [B,N,2D])."""

    mode: str = "add"
    scale: float = 0.01
    num_positions: int = 256

    @nn.compact
    def __call__(self, features: jnp.ndarray, voxels: jnp.ndarray) -> jnp.ndarray:
        if self.mode not in MODES:
            raise ValueError(f"position embedding mode {self.mode!r} is not one of {MODES}")
        features = features.astype(jnp.float32)
        if self.mode == "none":
            return features
        pe = position_embedding_3d(voxels, features.shape[-1], self.num_positions)
        if self.mode == "add":
            return features + self.scale * pe
        return jnp.concatenate([features, pe], axis=-1)
