"""3D sin/cos position embedding: the released 3D-LLM table, layout and modes."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm3d_jax.model.posembed import (
    PositionEmbedding3D,
    output_dim,
    position_embedding_3d,
    sincos_table,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "goldens", "qformer", "posembed.npz")


def _formula(num_positions: int, channels: int) -> np.ndarray:
    """Direct transcription of docs/reference.md, one entry at a time, in float64."""
    even = channels + channels % 2
    out = np.zeros((num_positions, channels))
    for p in range(num_positions):
        for j in range(channels):
            k = j // 2
            angle = p / 10000 ** (2 * k / even)
            out[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return out


@pytest.mark.parametrize("channels", [469, 11, 12])
def test_table_matches_formula(channels):
    # float32 angles (as the original computes them): p * inv_freq is off by up to ~255 ulp(1).
    np.testing.assert_allclose(sincos_table(256, channels), _formula(256, channels), atol=5e-5)


def test_table_matches_positional_encodings_package():
    """Golden rows of `PositionalEncoding1D`, the module the released code imports.

    Both compute float32 angles; torch's and numpy's float32 pow differ by an ulp in a few
    frequencies, which at p = 255 moves sin/cos by up to ~3e-5 (x 0.01 in the model: 3e-7).
    """
    with np.load(GOLDEN, allow_pickle=False) as g:
        np.testing.assert_allclose(sincos_table(256, 469)[g["rows_469"]], g["table_469"], atol=5e-5)
        np.testing.assert_allclose(sincos_table(256, 11), g["table_11"], atol=5e-5)
        np.testing.assert_allclose(sincos_table(256, 12), g["table_12"], atol=5e-5)


def test_known_values():
    table = sincos_table(256, 469)
    assert table.shape == (256, 469) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0, 0::2], 0.0)  # sin(0)
    np.testing.assert_array_equal(table[0, 1::2], 1.0)  # cos(0)
    np.testing.assert_allclose(table[1, :2], [math.sin(1.0), math.cos(1.0)], atol=1e-7)
    # k = 1 frequency: 1 / 10000^(2/470); column 468 is sin of the last frequency (C odd -> cut)
    np.testing.assert_allclose(table[255, 2], math.sin(255 / 10000 ** (2 / 470)), atol=1e-5)
    np.testing.assert_allclose(table[3, 468], math.sin(3 / 10000 ** (468 / 470)), atol=1e-7)


def test_3d_layout_concatenates_axes_and_zero_pads():
    voxels = jnp.array([[[0, 5, 255], [17, 17, 3]]], jnp.uint8)  # [1,2,3]
    pe = np.asarray(position_embedding_3d(voxels, 1408))
    table = sincos_table(256, 469)
    assert pe.shape == (1, 2, 1408)
    for n, (x, y, z) in enumerate([(0, 5, 255), (17, 17, 3)]):
        np.testing.assert_array_equal(pe[0, n, :469], table[x])
        np.testing.assert_array_equal(pe[0, n, 469:938], table[y])
        np.testing.assert_array_equal(pe[0, n, 938:1407], table[z])
        assert pe[0, n, 1407] == 0.0  # 1408 = 3 * 469 + 1


def test_modes():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 4, 30)).astype(np.float16)
    voxels = rng.integers(0, 256, (2, 4, 3))
    pe = np.asarray(position_embedding_3d(voxels, 30))
    added = PositionEmbedding3D(mode="add").apply({}, features, voxels)
    np.testing.assert_allclose(added, features.astype(np.float32) + 0.01 * pe, atol=1e-7)
    assert added.dtype == jnp.float32
    concat = PositionEmbedding3D(mode="concat").apply({}, features, voxels)
    assert concat.shape == (2, 4, output_dim("concat", 30)) == (2, 4, 60)
    np.testing.assert_array_equal(concat[..., 30:], pe)
    none = PositionEmbedding3D(mode="none").apply({}, features, voxels)
    np.testing.assert_array_equal(none, features.astype(np.float32))
    with pytest.raises(ValueError, match="not one of"):
        PositionEmbedding3D(mode="sum").apply({}, features, voxels)


def test_jit_and_out_of_range_voxels_clip():
    fn = jax.jit(lambda f, v: PositionEmbedding3D().apply({}, f, v))
    features = jnp.zeros((1, 2, 9))
    got = fn(features, jnp.array([[[300, -4, 255], [255, 0, 255]]]))
    np.testing.assert_array_equal(got[0, 0], got[0, 1])
