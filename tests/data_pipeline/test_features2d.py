"""ConceptFusion pixel features: the weighting formula, overlaps, masks, crops through the ViT."""

import numpy as np
import pytest

from data_pipeline import features2d
from llm3d_jax.fileio import InputError
from llm3d_jax.model import vit


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_fuse_mask_features_matches_the_formula():
    rng = np.random.default_rng(0)
    f_g = rng.normal(size=8)
    local = _unit(rng.normal(size=(3, 8)))
    got = features2d.fuse_mask_features(f_g, local)
    # Written out one mask at a time from docs/reference.md.
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    score = np.array(
        [
            cos(f_g, local[i]) - np.mean([cos(local[i], local[j]) for j in range(3)])
            for i in range(3)
        ]
    )
    w = np.exp(score) / np.exp(score).sum()
    for i in range(3):
        g = w[i] * _unit(f_g) + (1 - w[i]) * local[i]
        np.testing.assert_allclose(got[i], g / np.linalg.norm(g), atol=1e-6)


def test_overlapping_masks_share_rows_and_uncovered_pixels_drop():
    rng = np.random.default_rng(1)
    masks = np.zeros((2, 4, 5), bool)
    masks[0, :, :3] = True
    masks[1, :, 2:4] = True  # column 2 is covered by both, column 4 by none
    g = _unit(rng.normal(size=(2, 6)))
    rows_map, rows = features2d._coverage_rows(masks, g)
    assert rows.shape == (3, 6)
    assert (rows_map[:, 4] == -1).all()
    np.testing.assert_allclose(rows[rows_map[0, 0]], g[0], atol=1e-6)
    np.testing.assert_allclose(rows[rows_map[0, 3]], g[1], atol=1e-6)
    np.testing.assert_allclose(rows[rows_map[0, 2]], _unit(g[0] + g[1]), atol=1e-6)
    assert len(np.unique(rows_map[rows_map >= 0])) == 3


def test_instance_masks_cover_structure_but_not_misses():
    instance = np.array([[[-1, -1, 3], [3, 5, -1]]], np.int32)
    depth = np.array([[[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]], np.float32)
    (masks,) = features2d.instance_masks(instance, depth)
    assert masks.shape == (3, 2, 3)  # structure (-1 with a hit), 3, 5
    assert not masks[:, 0, 0].any()  # no hit: uncovered
    assert masks.sum(axis=0)[depth[0] > 0].tolist() == [1] * 5
    (rgb_only,) = features2d.instance_masks(instance)
    assert rgb_only.any(axis=0).all()


def test_mask_boxes_are_pixel_edges():
    masks = np.zeros((1, 6, 7), bool)
    masks[0, 2:4, 1:6] = True
    np.testing.assert_array_equal(features2d.mask_boxes(masks), [[2, 1, 4, 6]])


def test_pixel_features_through_the_vit():
    module, params = vit.random_vit(hidden_size=16)
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(2, 24, 20, 3), dtype=np.uint8)
    whole = np.ones((1, 24, 20), bool)
    half = np.zeros((1, 24, 20), bool)
    half[0, :12] = True
    masks = [np.concatenate([whole, half]), half]
    pix = features2d.pixel_features(module, params, rgb, masks, batch_size=4)
    assert pix.mask_ids.shape == (2, 24, 20)
    np.testing.assert_allclose(np.linalg.norm(pix.table, axis=1), 1, atol=1e-5)
    assert (pix.mask_ids[1, 12:] == -1).all() and (pix.mask_ids[1, :12] >= 0).all()
    # View 0: pixels in the top half are covered by both masks, the bottom half by one.
    assert pix.table.shape == (2 + 1, 16)
    # A crop of the whole frame encodes exactly like the frame.
    boxes = np.array([[0, 0, 24, 20], [0, 0, 24, 20]], np.float32)
    f = features2d.encode_boxes(module, params, rgb, np.array([0, 0]), boxes, batch_size=4)
    np.testing.assert_allclose(f[0], f[1], atol=1e-6)
    # The top-half crop is a different image, so its feature differs from the whole frame's.
    crop = features2d.encode_boxes(
        module, params, rgb, np.array([0]), np.array([[0, 0, 12, 20]], np.float32)
    )
    assert crop[0] @ f[0] < 0.9999


def test_masked_crops_see_only_their_mask():
    """A masked crop ignores what else is inside its box; a plain box crop does not."""
    module, params = vit.random_vit(hidden_size=16)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(1, 24, 20, 3), dtype=np.uint8)
    mask = np.zeros((1, 24, 20), bool)
    mask[0, :12, 4:16] = True
    mask[0, 6:12, 4:10] = False  # an L: the box [0, 4, 12, 16] holds pixels outside the mask
    other = rgb.copy()
    other[0, 6:12, 4:10] = 255 - other[0, 6:12, 4:10]  # change only those pixels
    boxes = features2d.mask_boxes(mask)
    np.testing.assert_array_equal(boxes, [[0, 4, 12, 16]])

    def crop(frames, masks=None):
        return features2d.encode_boxes(module, params, frames, np.array([0]), boxes, masks=masks)

    assert crop(rgb) @ crop(other).T < 0.9999
    np.testing.assert_allclose(crop(rgb, mask), crop(other, mask), atol=1e-6)
    # Masked = the plain crop of the frame with the outside painted the encoder's mean colour.
    painted = rgb.copy()
    painted[0][~mask[0]] = np.round(255 * np.asarray(module.config.image_mean))
    np.testing.assert_allclose(crop(rgb, mask), crop(painted), atol=1e-6)
    # pixel_features passes masked= through (two masks, so the crops weigh in beside f_G).
    masks = [np.concatenate([mask, ~mask])]
    plain, masked = (
        features2d.pixel_features(module, params, rgb, masks, masked=m).table for m in (False, True)
    )
    assert plain.shape == masked.shape and not np.allclose(plain, masked, atol=1e-4)


def test_mask_file_formats_and_bad_shapes(tmp_path):
    stack = np.zeros((2, 3, 4, 5), bool)
    stack[0, 0, :2] = True
    stack[1, 1, 2:] = True
    path = tmp_path / "s.npz"
    np.savez(path, masks=stack)
    masks = features2d.load_mask_file(str(path), (2, 4, 5))
    assert [m.shape for m in masks] == [(1, 4, 5), (1, 4, 5)]  # empty padding slots dropped
    labels = np.full((2, 4, 5), -1, np.int32)
    labels[0, 1:, 1:] = 7
    np.savez(path, masks=labels)
    masks = features2d.load_mask_file(str(path), (2, 4, 5))
    assert masks[0].shape == (1, 4, 5) and masks[1].shape == (0, 4, 5)
    with pytest.raises(
        InputError, match=r"s\.npz: masks .*shape \(2, 4, 5\), expected \(2, 4, 6\)"
    ):
        features2d.load_mask_file(str(path), (2, 4, 6))
    np.savez(path, masks=stack)
    with pytest.raises(InputError, match=r"expected \[3, M, 4, 5\]"):
        features2d.load_mask_file(str(path), (3, 4, 5))
    np.savez(path, other=stack)
    with pytest.raises(InputError, match="missing keys"):
        features2d.load_mask_file(str(path), (2, 4, 5))
