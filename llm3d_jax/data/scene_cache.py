"""Scenes resident on the accelerators (`data.scene_cache = "device"`).

The train split's scenes (every dataset of the mixture) are read once at start-up and uploaded;
per example the host then sends only the text ids, the scene's index, the point-sampling key and
which of the scene's instance ids the record names (`preprocess.CACHED_KEYS`: a few hundred
bytes, against the P x D feature bytes of the host path: 14 MB at 5000 x 1408 in fp16). The
jitted train step samples the points from the key and gathers them (`model_batch`), bit for bit
the batch `preprocess.Preprocess.collate` makes on the host for the same examples (the sampler is
integer arithmetic both sides compute alike: `preprocess.point_order`).

    scenes = read_scenes(data_dir, ["scanqa", "sqa3d"], "train")   # every scene once (tqdm)
    cache = upload(scenes, mesh, axes, ...)       # DeviceScenes; None: over the budget
    step = gathering_step(train_step, cache.spec) # step(state, frozen, batch, rng, cache.arrays)

Layout on the devices (T = points of all scenes, end to end; S = scenes; k = the size of the
mesh's batch axes, ('data', 'fsdp')):
  features  [T, Dp] features_dtype  columns split k ways (Dp: D padded to a multiple of k), so
                                    every device holds every point's Dp/k columns
  voxels    [T, 3] uint8            replicated
  slots     [T] int32               replicated: the point's instance id as an index into its
                                    scene's distinct ids (`SceneIndex.instance_ids`)
  starts, counts  [S] int32         replicated: scene s is points starts[s] .. + counts[s] - 1
Why columns: each device gathers its Dp/k columns of the whole batch's sampled points locally,
and one all_to_all over the batch axes hands every device its own batch rows at full width
(`gather_features`): the features cross the device interconnect once per step and never the
host link, and a device holds T x Dp / k of them. (Split by scene instead, every device would
need every other device's scenes for its rows.)

When the per-device share exceeds `data.scene_cache_budget_gb`, `upload` returns None and the
scenes stay in host RAM (`Scenes.expand`: the host gathers the sampled rows from memory, no
TFDS read per example; the batches are the host layout, the train step the usual one).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from llm3d_jax.data import preprocess, sources

GIB = 1 << 30
TEXT_KEYS = ("prompt_ids", "prompt_mask", "answer_ids", "answer_mask")


@dataclasses.dataclass(frozen=True)
class SceneIndex:
    """What the host needs per example once the points are cached: small (grain worker
    processes get a copy)."""

    scene_ids: tuple[str, ...]
    grid_origin: np.ndarray  # float32 [S,3]
    grid_voxel: np.ndarray  # float32 [S]
    instance_ids: tuple[np.ndarray, ...]  # int32 [M_s]: each scene's distinct instance ids, sorted

    @property
    def object_slots(self) -> int:
        """Width of an example's `object_mask`: the most distinct instance ids of a scene."""
        return max([len(ids) for ids in self.instance_ids] + [1])

    def scene(self, s: int) -> dict:
        """Scene `s` as `preprocess.Preprocess` reads it in the cached layout."""
        if not 0 <= s < len(self.scene_ids):
            raise IndexError(f"scene index {s} outside the {len(self.scene_ids)} cached scenes")
        return {
            "index": s,
            "scene_id": self.scene_ids[s],
            "grid_origin": self.grid_origin[s],
            "grid_voxel": np.float32(self.grid_voxel[s]),
            "instance_ids": self.instance_ids[s],
        }


@dataclasses.dataclass(frozen=True)
class Scenes:
    """Every scene of a split (of one or more datasets) end to end in host RAM, as stored."""

    index: SceneIndex
    offsets: dict  # dataset name -> cache index of its first scene
    starts: np.ndarray  # int64 [S]
    counts: np.ndarray  # int64 [S]
    features: np.ndarray  # float16 [T,D]
    voxels: np.ndarray  # uint8 [T,3]
    slots: np.ndarray  # int32 [T]

    def view(self, s: int) -> dict:
        """Scene `s`'s points as `preprocess.fill_points` / `target_points` read them (views, no
        copy); `instance` holds slots, so objects are named by slot (`expand`)."""
        a, b = int(self.starts[s]), int(self.starts[s] + self.counts[s])
        return {
            "features": self.features[a:b],
            "voxels": self.voxels[a:b],
            "instance": self.slots[a:b],
        }

    def expand(self, arrays: dict, fn: preprocess.Preprocess) -> dict:
        """A batch in the cached layout -> the host layout, the points gathered here from RAM:
        what `fn` (a Preprocess of the cached layout) would have collated on the host path."""
        examples = []
        for i, s in enumerate(arrays["scene"]):
            scene = self.view(int(s))
            keep = fn.keep(len(scene["features"]), arrays["sample_key"][i])
            order = arrays["object_mask"][i]
            named = np.flatnonzero(order)
            named = named[np.argsort(order[named], kind="stable")]  # the named ids, as slots
            example = {k: arrays[k][i] for k in TEXT_KEYS}
            examples.append({**example, "points": (scene, keep), "meta": {"object_ids": named}})
        host, _ = dataclasses.replace(fn, object_slots=0).collate(examples)
        return host


def read_scenes(data_dir: str, names, split: str, progress: bool = True) -> Scenes:
    """Every scene record of `split` of each dataset in `names` (TFDS `llm3d_scenes/<name>`),
    read once, in dataset then record order."""
    parts = [sources.open_source(data_dir, sources.SCENE_DATASET, n, split) for n in names]
    ids, origins, voxel_sizes, instance_ids = [], [], [], []
    features, voxels, slots, offsets = [], [], [], {}
    bar = tqdm(total=sum(len(p) for p in parts), desc="scene cache", disable=not progress)
    for name, part in zip(names, parts):
        offsets[name] = len(ids)
        for i in range(len(part)):
            scene = sources.scene_record(part[i])
            distinct, slot = np.unique(np.asarray(scene["instance"]), return_inverse=True)
            ids.append(scene["scene_id"])
            origins.append(np.asarray(scene["grid_origin"], np.float32))
            voxel_sizes.append(scene["grid_voxel"])
            instance_ids.append(distinct.astype(np.int32))
            features.append(np.asarray(scene["features"], np.float16))
            voxels.append(np.asarray(scene["voxels"], np.uint8))
            slots.append(slot.reshape(-1).astype(np.int32))
            bar.update(1)
    bar.close()
    if not ids:
        raise ValueError(f"{data_dir}: no scenes in the {split} split of {list(names)}")
    counts = np.array([len(f) for f in features], np.int64)
    return Scenes(
        index=SceneIndex(
            tuple(ids),
            np.stack(origins),
            np.asarray(voxel_sizes, np.float32),
            tuple(instance_ids),
        ),
        offsets=offsets,
        starts=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
        counts=counts,
        features=np.concatenate(features),
        voxels=np.concatenate(voxels),
        slots=np.concatenate(slots),
    )


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The static side of a device cache (hashable: the jitted step closes over it)."""

    mesh: jax.sharding.Mesh
    axes: tuple[str, ...]  # the batch's mesh axes; the feature columns split over them
    shards: int  # their size, k
    dim: int  # D, before padding the columns to a multiple of k
    max_points: int  # the largest scene
    num_points: int  # P
    profile: str
    blind: bool


@dataclasses.dataclass(frozen=True)
class DeviceScenes:
    arrays: dict  # {"features", "voxels", "slots", "starts", "counts"}: jax.Arrays (module doc)
    spec: CacheSpec

    @property
    def shardings(self) -> dict:
        return {k: v.sharding for k, v in self.arrays.items()}

    @property
    def per_device_bytes(self) -> int:
        return sum(v.addressable_shards[0].data.nbytes for v in self.arrays.values())


def per_device_bytes(scenes: Scenes, shards: int, features_dtype) -> int:
    """What `upload` would put on each device: Dp/k feature columns of every point, the
    replicated voxels, slots, starts and counts."""
    t, d = scenes.features.shape
    columns = math.ceil(d / shards)
    return t * columns * np.dtype(features_dtype).itemsize + t * (3 + 4) + 8 * len(scenes.counts)


def upload(
    scenes: Scenes,
    mesh: jax.sharding.Mesh,
    axes: tuple[str, ...],
    *,
    features_dtype,
    budget_gb: float,
    num_points: int,
    profile: str,
    blind: bool,
) -> DeviceScenes | None:
    """The scenes onto `mesh` (module doc: features in `features_dtype`, converted here once, so
    the values are the host path's), or None when a device's share exceeds `budget_gb` GiB.
    Every process passes the same `scenes` and supplies its own devices' shards."""
    shards = math.prod(mesh.shape[a] for a in axes)
    if per_device_bytes(scenes, shards, features_dtype) > budget_gb * GIB:
        return None
    t, d = scenes.features.shape
    width = math.ceil(d / shards) * shards

    def columns(index):  # one device's shard: every point, a block of columns
        start, stop, _ = index[1].indices(width)
        out = np.zeros((t, stop - start), features_dtype)
        real = min(stop, d) - start
        if real > 0:
            out[:, :real] = scenes.features[:, start : start + real]
        return out

    split = NamedSharding(mesh, P(None, axes))
    replicated = NamedSharding(mesh, P())
    put = lambda x: jax.make_array_from_callback(x.shape, replicated, lambda i: x[i])
    arrays = {
        "features": jax.make_array_from_callback((t, width), split, columns),
        "voxels": put(scenes.voxels),
        "slots": put(scenes.slots),
        "starts": put(scenes.starts.astype(np.int32)),
        "counts": put(scenes.counts.astype(np.int32)),
    }
    spec = CacheSpec(
        mesh, tuple(axes), shards, d, int(scenes.counts.max()), num_points, profile, blind
    )
    return DeviceScenes(arrays, spec)


def sample_rows(key, n, spec: CacheSpec):
    """key uint32 [B,2], n int32 [B] (the scenes' point counts) -> (rows int32 [B,P] into each
    scene, valid bool [B,P]): `preprocess.Preprocess.keep` on the device. More points than P:
    the P rows of smallest `point_order` under the key, in row order; else all rows, the rest
    padding (not valid). Release profile: the first P rows."""
    p = spec.num_points
    first = jnp.arange(p, dtype=jnp.int32)[None, :]  # [1,P]
    valid = first < n[:, None]  # [B,P]
    if spec.profile == "release" or spec.max_points <= p:
        return jnp.broadcast_to(first, valid.shape), valid
    rows = jnp.arange(spec.max_points, dtype=jnp.uint32)[None, :]  # [1,M]
    real = rows < n[:, None].astype(jnp.uint32)  # [B,M]: rows past a scene's end are not
    order = preprocess.point_order(rows, key[:, :1], key[:, 1:])  # uint32 [B,M]
    order = jnp.where(real, order, jnp.uint32(0xFFFFFFFF))

    # The P-th smallest order of each scene, one bit at a time from the top: the largest t
    # with fewer than P orders below it (32 passes of a compare and a count; a sort of the M
    # orders took 3-10x that on a CPU). The orders of a scene's rows are distinct, so exactly
    # P rows are at or below it when the scene has more than P.
    def bit(i, t):
        candidate = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(jnp.sum(order < candidate[:, None], axis=1) < p, candidate, t)

    threshold = jax.lax.fori_loop(0, 32, bit, jnp.zeros(len(n), jnp.uint32))  # [B]
    taken = real & (order <= threshold[:, None])  # [B,M]: P per scene with more than P
    slot = jnp.where(taken, jnp.cumsum(taken, axis=1) - 1, p)  # its place, in row order
    batch = jnp.broadcast_to(jnp.arange(len(n))[:, None], taken.shape)
    picked = jnp.zeros((len(n), p), jnp.int32)
    picked = picked.at[batch, slot].set(rows.astype(jnp.int32), mode="drop")  # [B,P]
    sampled = (n > p)[:, None]
    return jnp.where(sampled, picked, first), valid | sampled


def gather_features(features, flat, spec: CacheSpec):
    """features [T,Dp] (columns split over the batch axes), flat int32 [B,P] (point indices,
    rows split over the batch axes) -> [B,P,D], rows split over the batch axes."""
    if spec.shards == 1:
        return features[flat][..., : spec.dim]
    axes = spec.axes

    def local(cols, idx):  # cols [T, Dp/k]: this device's columns; idx [B/k, P]: its rows
        idx = jax.lax.all_gather(idx, axes, axis=0, tiled=True)  # [B, P]: the whole batch's
        got = cols[idx]  # [B, P, Dp/k]
        # Row block j goes to device j; the column blocks arrive in device order: [B/k, P, Dp]
        return jax.lax.all_to_all(got, axes, 0, 2, tiled=True)

    out = jax.shard_map(
        local, mesh=spec.mesh, in_specs=(P(None, axes), P(axes)), out_specs=P(axes)
    )(features, flat)
    return out[..., : spec.dim]


def model_batch(arrays: dict, batch: dict, spec: CacheSpec) -> dict:
    """A batch in the cached layout (`preprocess.CACHED_KEYS`, [B, ...]) -> the model's batch
    (`preprocess.MODEL_KEYS`), inside jit; equal to what `Preprocess.collate` makes on the host
    for the same examples (tests/data/test_scene_cache.py)."""
    scene = batch["scene"]  # int32 [B]
    n = arrays["counts"][scene]  # int32 [B]
    rows, valid = sample_rows(batch["sample_key"], n, spec)  # int32 [B,P], bool [B,P]
    flat = jnp.where(valid, arrays["starts"][scene][:, None] + rows, 0)  # [B,P] into T
    features = gather_features(arrays["features"], flat, spec)  # [B,P,D]
    features = jnp.where(valid[..., None], features, jnp.zeros((), features.dtype))
    voxels = jnp.where(valid[..., None], arrays["voxels"][flat].astype(jnp.int32), 0)  # [B,P,3]
    named = jnp.take_along_axis(batch["object_mask"], arrays["slots"][flat], axis=1)  # [B,P]
    if spec.blind:  # the no-3D baseline: the host path zeroes them after the gather too
        features, voxels = jnp.zeros_like(features), jnp.zeros_like(voxels)
    point_mask = jnp.ones_like(valid) if spec.profile == "release" else valid
    out = {
        "features": features,
        "voxels": voxels,
        "point_mask": point_mask,
        "point_target": jnp.where(valid, named, jnp.int8(0)),
    }
    return {**out, **{k: batch[k] for k in TEXT_KEYS}}


def gathering_step(train_step, spec: CacheSpec):
    """train_step(state, frozen, batch, rng) -> step(state, frozen, cached batch, rng, arrays):
    the same step, its batch gathered from the cache first (`model_batch`), inside the jit."""

    def step(state, frozen, batch, rng, arrays):
        return train_step(state, frozen, model_batch(arrays, batch, spec), rng)

    return step
