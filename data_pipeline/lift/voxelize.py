"""Lifted points -> the 256^3 grid of the scene feature file (docs/reference.md).

Grid: origin = the AABB minimum, voxel = largest extent / 256, nudged up by a few float32 ulps
when needed so that the top face still falls in voxel 255. The invariant every reader relies on,
`voxels == floor((points - grid_origin) / grid_voxel)`, holds exactly in float32 for every
stored point (the voxel indices are computed from the stored float32 points at the end).

One output point per occupied voxel: the mean position and colour of its points, the majority
instance id, and the mean of its points' features, renormalised (features go voxel <- point <-
table row through one sparse matrix, so no [points, D] array is built). An optional cap keeps a
seeded random subset of voxels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse

from data_pipeline.lift import LiftedPoints

GRID = 256


def grid_for_bounds(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(origin float32 [3], voxel float32) of the 256^3 cube covering the AABB [lo, hi]."""
    origin = np.asarray(lo, np.float32)
    hi = np.asarray(hi, np.float32)
    extent = float(np.max(hi - origin))
    voxel = np.float32(max(extent, 1e-6) / GRID)
    while np.floor((hi - origin) / voxel).max() > GRID - 1:
        voxel = np.nextafter(voxel, np.float32(np.inf))
    return origin, voxel


def voxel_indices(points: np.ndarray, origin: np.ndarray, voxel: np.float32) -> np.ndarray:
    """floor((p - origin) / voxel) in float32, as int64 [N,3]."""
    p = np.asarray(points, np.float32)
    return np.floor((p - np.asarray(origin, np.float32)) / np.float32(voxel)).astype(np.int64)


def _majority(group: np.ndarray, labels: np.ndarray, num_groups: int) -> np.ndarray:
    """Most frequent label per group (ties: the smallest label)."""
    low = labels.min()
    span = int(labels.max() - low) + 1
    pairs, counts = np.unique(group * span + (labels - low), return_counts=True)
    pair_group, pair_label = pairs // span, pairs % span + low
    order = np.lexsort((pair_label, -counts, pair_group))  # by group, count desc, label asc
    first = np.ones(len(order), bool)
    first[1:] = pair_group[order][1:] != pair_group[order][:-1]
    out = np.full(num_groups, -1, np.int64)
    out[pair_group[order][first]] = pair_label[order][first]
    return out


def balanced_sample(owner: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `k` of the items, each `owner` value getting an equal share; an owner
    with fewer items than its share keeps all of them and the rest is shared among the others."""
    owners, inverse, sizes = np.unique(owner, return_inverse=True, return_counts=True)
    quota = np.zeros(len(owners), np.int64)
    left = k
    open_ = np.ones(len(owners), bool)
    while left > 0 and open_.any():
        share = max(left // int(open_.sum()), 1)
        for i in np.flatnonzero(open_):
            take = min(share, sizes[i] - quota[i], left)
            quota[i] += take
            left -= take
            if quota[i] == sizes[i]:
                open_[i] = False
            if left == 0:
                break
    keep = [
        rng.choice(np.flatnonzero(inverse == i), quota[i], replace=False)
        for i in range(len(owners))
        if quota[i]
    ]
    return np.sort(np.concatenate(keep))


@jax.jit
def _unit_f16(values):
    """Rows scaled to unit length, as float16 (XLA's vectorised conversion; numpy's is scalar)."""
    norm2 = jnp.sum(values * values, axis=1, keepdims=True)
    return (values * jax.lax.rsqrt(jnp.maximum(norm2, 1e-24))).astype(jnp.float16)


@jax.jit
def _block_product_f16(coef, table):
    return _unit_f16(coef @ table)


def _rows_product(to_rows: sparse.csr_matrix, table: np.ndarray, block: int = 4096) -> np.ndarray:
    """Unit rows of `to_rows @ table` as float16 [V,D], in fixed-size blocks of voxels (one
    compilation): a small table (mask features) goes through a dense float32 product per block,
    a large one (one row per point) through scipy's sparse product."""
    num, k = to_rows.shape
    out = np.empty((num, table.shape[1]), np.float16)
    dense_path = k <= 4096
    table_dev = jnp.asarray(table) if dense_path else None
    for start in range(0, num, block):
        part = to_rows[start : start + block]
        n = part.shape[0]
        if dense_path:
            coef = np.zeros((block, k), np.float32)
            coef[:n] = part.toarray()
            out[start : start + n] = np.asarray(_block_product_f16(coef, table_dev))[:n]
        else:
            values = np.zeros((block, table.shape[1]), np.float32)
            values[:n] = part @ table
            out[start : start + n] = np.asarray(_unit_f16(values))[:n]
    return out


def voxelize(
    lifted: LiftedPoints,
    origin: np.ndarray | None = None,
    voxel: float | None = None,
    max_points: int | None = None,
    seed: int = 0,
    balance: bool = False,
) -> dict[str, np.ndarray]:
    """-> points float32 [N,3], features float16 [N,D] (unit rows), voxels uint8 [N,3],
    colors uint8 [N,3], instance int32 [N], grid_origin float32 [3], grid_voxel float32 [].

    Without `origin`/`voxel` the grid covers the points' AABB; a given grid must cover them.
    `max_points` keeps a seeded sample of the voxels: uniform, or with `balance` an equal share
    per instance (the background counts as one), so that small objects are not lost among the
    floor and walls, which hold most of a room's surface.
    """
    if len(lifted) == 0:
        raise ValueError("no points to voxelize")
    points = np.asarray(lifted.points, np.float32)
    if origin is None or voxel is None:
        origin, voxel = grid_for_bounds(points.min(axis=0), points.max(axis=0))
    origin, voxel = np.asarray(origin, np.float32), np.float32(voxel)
    idx = voxel_indices(points, origin, voxel)
    if idx.min() < 0 or idx.max() > GRID - 1:
        raise ValueError("points lie outside the 256^3 grid")
    key = (idx[:, 0] * GRID + idx[:, 1]) * GRID + idx[:, 2]
    _, group = np.unique(key, return_inverse=True)
    group = group.reshape(-1)
    num = int(group.max()) + 1
    keep_groups = np.arange(num)
    if max_points is not None and num > max_points:
        rng = np.random.default_rng(seed)
        if balance:
            owner = _majority(group, np.asarray(lifted.instance, np.int64), num)
            keep_groups = balanced_sample(owner, max_points, rng)
        else:
            keep_groups = np.sort(rng.choice(num, max_points, replace=False))
        remap = np.full(num, -1, np.int64)
        remap[keep_groups] = np.arange(len(keep_groups))
        group = remap[group]
        num = len(keep_groups)
    in_kept = group >= 0
    g = group[in_kept]
    count = np.bincount(g, minlength=num).astype(np.float64)

    mean_points = (
        np.stack([np.bincount(g, points[in_kept, a].astype(np.float64), num) for a in range(3)], 1)
        / count[:, None]
    )
    mean_colors = (
        np.stack(
            [np.bincount(g, lifted.colors[in_kept, a].astype(np.float64), num) for a in range(3)], 1
        )
        / count[:, None]
    )
    instance = _majority(g, lifted.instance[in_kept].astype(np.int64), num)

    # voxel feature = mean over its points of (sum_k w_k row_k / sum_k w_k): one sparse product.
    weight_sum = np.bincount(lifted.ref_point, lifted.ref_weight, len(points))
    ref_group = group[lifted.ref_point]
    ok = ref_group >= 0
    coef = lifted.ref_weight[ok] / weight_sum[lifted.ref_point[ok]] / count[ref_group[ok]]
    to_rows = sparse.csr_matrix(  # duplicates (same voxel and row) are summed here
        (coef.astype(np.float32), (ref_group[ok], lifted.ref_row[ok])),
        shape=(num, len(lifted.table)),
    )
    features = _rows_product(to_rows, np.asarray(lifted.table, np.float32))

    # A mean lies between its points, so it stays inside the grid; its voxel is recomputed from
    # the stored float32 value (a mean can round across a cell face).
    out_points = mean_points.astype(np.float32)
    voxels = voxel_indices(out_points, origin, voxel)
    assert voxels.min() >= 0 and voxels.max() <= GRID - 1
    return {
        "points": out_points,
        "features": features,
        "voxels": voxels.astype(np.uint8),
        "colors": np.clip(np.rint(mean_colors), 0, 255).astype(np.uint8),
        "instance": instance.astype(np.int32),
        "grid_origin": origin,
        "grid_voxel": np.asarray(voxel, np.float32),
    }
