"""grain pipelines over the TFDS sources, ending in global jax.Arrays on the mesh.

train: per dataset [host slice -> shuffle -> repeat] -> weighted mix -> preprocess (seeded per
       example) -> batch -> threads prefetch [-> worker processes] -> global arrays. With
       `profile="release"` the host slice is expanded before shuffling into one row per
       distinct answer of each record (the released 3D-LLM's training rows,
       `preprocess.distinct_answers`). With `scene_cache="device"` the scenes are read once and
       uploaded (llm3d_jax.data.scene_cache): a record is joined with its scene's small
       host-side facts only, and the batches name the points instead of carrying them.
eval:  one dataset, host slice padded to whole batches (padding rows: `valid` False, no answer
       tokens) -> preprocess -> batch; one pass, or `epochs=None` to cycle.

`worker_count` > 0 runs the per-example work (reading, tokenising, gathering) in that many grain
worker processes (`mp_prefetch`: each takes every worker_count-th batch, in order, so the stream
is the one of `worker_count=0`); the iterator state then is grain's multi-process state (a
checkpoint resumes with the same `worker_count`). A script that uses them needs an
`if __name__ == "__main__":` guard (the workers are spawned).

Slicing happens before shuffling: host i of P reads records i, i+P, i+2P, ... of every dataset,
so hosts are disjoint and together cover each epoch. Everything is index-based (MapDataset), so
the iterator state is one small JSON-able dict and restoring it resumes the exact stream.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import grain
import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm3d_jax.data import holdout, preprocess
from llm3d_jax.data import scene_cache as scene_cache_lib
from llm3d_jax.data.sources import (
    LANGUAGE_DATASET,
    CachedJoin,
    SceneJoin,
    dataset_metadata,
    open_source,
)

BATCH_AXES = ("data", "fsdp")  # the `batch` logical axis (docs/architecture.md)
# float16 is the stored precision: no conversion on the host (casting 5000 x 1408 to bfloat16
# takes 8x the copy); the model's first op converts to float32 on the device, so float16 and
# float32 features give the same numbers.
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SCENE_CACHES = ("host", "device")


def parse_mixture(datasets) -> list[tuple[str, float]]:
    """ "scanqa:2,sqa3d:1" / {"scanqa": 2} / ["scanqa", ("sqa3d", 1)] -> [(name, weight)]."""
    if isinstance(datasets, str):
        items = []
        for part in filter(None, (p.strip() for p in datasets.split(","))):
            name, _, weight = part.partition(":")
            items.append((name.strip(), float(weight) if weight else 1.0))
    elif isinstance(datasets, Mapping):
        items = [(str(k), float(v)) for k, v in datasets.items()]
    else:
        items = [(d, 1.0) if isinstance(d, str) else (str(d[0]), float(d[1])) for d in datasets]
    if not items or any(w <= 0 for _, w in items):
        raise ValueError(
            f"datasets must name at least one dataset with weight > 0, got {datasets!r}"
        )
    return items


def load_tokenizer(tokenizer):
    """A tokenizer object, or a local HF tokenizer directory to load (offline)."""
    if isinstance(tokenizer, str):
        from llm3d_jax import tokens

        return tokens.load_tokenizer(tokenizer)
    if tokenizer is None:
        raise ValueError("a tokenizer (object or directory) is needed to tokenise the records")
    return tokenizer


class BatchIterator:
    """Iterates global batches: {key: jax.Array [B, ...]} with the mesh's batch sharding.

    With `mesh=None` the batches stay host numpy arrays (this host's rows only). `last_metadata`
    holds the host-side metadata (id, scene_id, dataset, task, prompt, answers, object_ids,
    grid_origin, grid_voxel, valid) of this host's rows of the last batch, in row order.
    `get_state()` / `set_state()` exchange a JSON-able dict (orbax: grain.checkpoint handler
    over JSON, see llm3d_jax.train.checkpoint).

    `scene_cache`: the scenes on the devices (`scene_cache.DeviceScenes`) when the batches are
    in the cached layout (`preprocess.CACHED_KEYS`; the train step gathers the points), else
    None. `expand`: for scenes held in host RAM, turns a cached-layout batch into the host
    layout here. `sent_bytes`: the bytes of every batch array handed over so far (what moves
    host -> device).
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        mesh,
        global_batch: int,
        loc_offset: int,
        scene_cache: scene_cache_lib.DeviceScenes | None = None,
        expand=None,
    ):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self._initial = self._iterator.get_state()
        self.mesh = mesh
        self.global_batch = global_batch
        self.loc_offset = loc_offset
        self.scene_cache = scene_cache
        self._expand = expand
        self.sent_bytes = 0
        self.last_metadata: list[dict] = []
        self._sharding = None
        if mesh is not None:
            axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
            self._sharding = NamedSharding(mesh, P(axes or None))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        arrays, self.last_metadata = next(self._iterator)
        if self._expand is not None:
            arrays = self._expand(arrays)
        self.sent_bytes += sum(v.nbytes for v in arrays.values())
        if self._sharding is None:
            return arrays
        # One call for the whole batch (one transfer per field): this host's rows become its
        # devices' shards.
        shapes = {k: (self.global_batch, *v.shape[1:]) for k, v in arrays.items()}
        return jax.make_array_from_process_local_data(self._sharding, arrays, shapes)

    def get_state(self) -> dict:
        return {"grain": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["grain"])

    def reset(self) -> None:
        """Back to the first batch (e.g. the same validation batches at every evaluation)."""
        self._iterator.set_state(self._initial)

    def close(self) -> None:
        """Stops the reader threads and worker processes now (else at garbage collection)."""
        self._iterator.close()


def _host(process_index, process_count) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, {count})")
    return index, count


def _host_batch(batch_size: int, count: int) -> int:
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {count} processes")
    return batch_size // count


def make_preprocess(
    data_dir, names, tokenizer, loc_bins, prompt_templates, train, object_slots=0, **shapes
):
    """-> (Preprocess for the datasets `names`, its TextEncoder). Templates: each dataset's
    defaults (its TFDS metadata) updated with `prompt_templates`. `object_slots` > 0: the
    cached layout (`preprocess.Preprocess.object_slots`)."""
    templates = {}
    for name in names:
        table = dict(dataset_metadata(data_dir, name).get("prompt_templates", {}))
        table.update(prompt_templates or {})
        templates[name] = table
    encoder = preprocess.TextEncoder.create(load_tokenizer(tokenizer), loc_bins)
    dtype = _DTYPES[shapes.pop("features_dtype")]
    return preprocess.Preprocess(
        encoder, templates, features_dtype=dtype, train=train, object_slots=object_slots, **shapes
    ), encoder


def answer_rows(join, records) -> list[tuple[int, int]]:
    """(record index, distinct-answer index) for every distinct answer of each of `records` of
    `join` (a SceneJoin or a holdout.Rows of one; reads the language records only, not the
    scenes)."""
    return [
        (i, k) for i in records for k in range(len(preprocess.distinct_answers(join.answers(i))))
    ]


def _with_answer(joined, answer_index: int):
    record, scene = joined
    return {**record, "answer_index": answer_index}, scene


def _allow_worker_processes() -> None:
    """grain's worker processes read absl flags; a program that is not an absl app (a test, a
    notebook) has parsed none, and grain's read would fail."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _batch_iterator(
    ds, fn, encoder, seed, host_batch, read_threads, worker_count, mesh, batch_size, **cache
):
    """(record source, Preprocess) -> host batches read by threads (in `worker_count` worker
    processes when > 0) -> global-array iterator; `cache`: BatchIterator's scene_cache /
    expand."""
    ds = ds.random_map(fn, seed=seed).batch(host_batch, drop_remainder=True, batch_fn=fn.collate)
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    )
    if worker_count:
        _allow_worker_processes()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return BatchIterator(ds, mesh, batch_size, encoder.loc_offset, **cache)


def _check_cache_settings(scene_cache_mode: str, worker_count: int) -> None:
    if scene_cache_mode not in SCENE_CACHES:
        raise ValueError(f"scene_cache must be one of {SCENE_CACHES}, got {scene_cache_mode!r}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")


def _cache_mesh(mesh) -> tuple[jax.sharding.Mesh, tuple[str, ...]]:
    """The mesh the cache goes on and its batch axes (`mesh=None`: the first device)."""
    if mesh is None:
        auto = (jax.sharding.AxisType.Auto,)
        mesh = jax.make_mesh((1,), ("data",), axis_types=auto, devices=jax.devices()[:1])
    return mesh, tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def make_train_iterator(
    data_dir: str,
    tokenizer=None,
    mesh=None,
    *,
    batch_size: int,
    seed: int = 0,
    datasets="synthetic",
    num_points: int = 5000,
    prompt_len: int = 64,
    answer_len: int = 40,
    loc_bins: int = 256,
    features_dtype: str = "float16",
    blind: bool = False,
    profile: str = "ours",
    prompt_templates: Mapping[str, str] | None = None,
    read_threads: int = 4,
    worker_count: int = 0,
    scene_cache: str = "host",
    scene_cache_budget_gb: float = 4.0,
    process_index: int | None = None,
    process_count: int | None = None,
    hold_out_eval_scenes: bool = False,
    annotations_dir: str = "",
    held_out_annotations: str | Sequence[str] = holdout.EVAL_ANNOTATIONS,
) -> BatchIterator:
    """Endless shuffled training batches of the `train` split (see module doc); `profile`:
    "ours" or "release" (`llm3d_jax.data.preprocess` module doc).

    `scene_cache`: "host" (each example reads its scene record and the host gathers its
    points) or "device": every scene of the split is read once, then uploaded onto `mesh` when a
    device's share fits in `scene_cache_budget_gb` GiB (`BatchIterator.scene_cache`; the batches
    name the points, the train step gathers them) or else kept in host RAM (the host gathers
    the points from memory). Either way the model sees the batches of "host".

    `hold_out_eval_scenes`: leave out every record whose scene appears in one of the
    `held_out_annotations` files (relative names inside `annotations_dir`; by default ScanQA's
    and SQA3D's validation and test files), counted on stdout per dataset
    (`llm3d_jax.data.holdout`)."""
    _check_cache_settings(scene_cache, worker_count)
    index, count = _host(process_index, process_count)
    host_batch = _host_batch(batch_size, count)
    mixture = parse_mixture(datasets)
    names = [n for n, _ in mixture]
    held = set()
    if hold_out_eval_scenes:
        paths = holdout.annotation_paths(annotations_dir, held_out_annotations)
        held = holdout.held_out_scenes(paths)
    scenes = None
    if scene_cache == "device":
        scenes = scene_cache_lib.read_scenes(data_dir, names, "train", progress=index == 0)
    parts = []
    for k, (name, _) in enumerate(mixture):
        if scenes is None:
            join = SceneJoin.open(data_dir, name, "train")
        else:
            language = open_source(data_dir, LANGUAGE_DATASET, name, "train")
            join = CachedJoin(language, scenes.index, scenes.offsets[name])
        source = join
        if held:
            source = holdout.Rows(join, holdout.kept_rows(join.language, held))
            if index == 0:
                print(
                    f"{name}: {len(join) - len(source)} of {len(join)} train records left out, "
                    f"their scenes are among the {len(held)} of the held-out annotations"
                )
        if len(source) < count:
            raise ValueError(
                f"{data_dir}: {name} train has {len(source)} records for {count} hosts"
            )
        if profile == "release":
            rows = answer_rows(source, range(index, len(source), count))
            part = grain.MapDataset.source(rows).shuffle(seed=seed * 1000 + k).repeat()
            part = part.map(lambda r, source=source: _with_answer(source[r[0]], r[1]))
        else:
            part = grain.MapDataset.source(source)[index::count]
            part = part.shuffle(seed=seed * 1000 + k).repeat()
        parts.append(part.map(lambda x, name=name: (name, x, True)))
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [w for _, w in mixture])
    fn, encoder = make_preprocess(
        data_dir,
        names,
        tokenizer,
        loc_bins,
        prompt_templates,
        True,
        object_slots=0 if scenes is None else scenes.index.object_slots,
        num_points=num_points,
        prompt_len=prompt_len,
        answer_len=answer_len,
        features_dtype=features_dtype,
        blind=blind,
        profile=profile,
    )
    cache = {}
    if scenes is not None:
        cache = _place_scenes(scenes, fn, mesh, scene_cache_budget_gb, log=index == 0)
    return _batch_iterator(
        mixed, fn, encoder, seed, host_batch, read_threads, worker_count, mesh, batch_size, **cache
    )


def _place_scenes(scenes, fn, mesh, budget_gb: float, log: bool) -> dict:
    """The scenes onto the devices, or left in host RAM when a device's share is over
    `budget_gb` -> BatchIterator's scene_cache= / expand= keywords."""
    cache_mesh, axes = _cache_mesh(mesh)
    say = print if log else (lambda *a: None)
    placed = scene_cache_lib.upload(
        scenes,
        cache_mesh,
        axes,
        features_dtype=fn.features_dtype,
        budget_gb=budget_gb,
        num_points=fn.num_points,
        profile=fn.profile,
        blind=fn.blind,
    )
    t, d = scenes.features.shape
    what = f"{len(scenes.counts)} scenes, {t:,} points x {d}"
    if placed is None:
        shards = math.prod(cache_mesh.shape[a] for a in axes)
        need = scene_cache_lib.per_device_bytes(scenes, shards, fn.features_dtype)
        say(
            f"scene cache: {what} need {need / scene_cache_lib.GIB:.2f} GiB per device, over "
            f"scene_cache_budget_gb {budget_gb}: kept in host RAM, gathered on the host"
        )
        return {"expand": functools.partial(scenes.expand, fn=fn)}
    say(
        f"scene cache: {what} on the devices, {placed.per_device_bytes / 2**20:.1f} MiB per "
        f"device (columns split {placed.spec.shards} ways)"
    )
    return {"scene_cache": placed}


def make_eval_iterator(
    data_dir: str,
    tokenizer=None,
    mesh=None,
    *,
    batch_size: int,
    seed: int = 0,
    datasets="synthetic",
    split: str = "validation",
    epochs: int | None = 1,
    num_points: int = 5000,
    prompt_len: int = 64,
    answer_len: int = 40,
    loc_bins: int = 256,
    features_dtype: str = "float16",
    blind: bool = False,
    profile: str = "ours",
    prompt_templates: Mapping[str, str] | None = None,
    read_threads: int = 4,
    worker_count: int = 0,
    scene_cache: str = "host",
    scene_cache_budget_gb: float = 4.0,
    process_index: int | None = None,
    process_count: int | None = None,
    hold_out_eval_scenes: bool = False,
    annotations_dir: str = "",
    held_out_annotations: str | Sequence[str] = (),
) -> BatchIterator:
    """Every record of `split` of the first dataset in `datasets`, in stored order, padded to
    whole batches (padding: metadata `valid` False, answer_mask all False). Point subsets are
    seeded by `seed` and the record's position, so evaluations are repeatable. The hold-out
    options are the train iterator's (one `data` config serves both); evaluation reads every
    record of the split. So are the scene-cache options: evaluation stays on the host path
    (a few batches per validation, and eval.py's one pass reads each record once), so its
    batches are always the host layout that eval steps and generation take."""
    del hold_out_eval_scenes, annotations_dir, held_out_annotations, scene_cache_budget_gb
    _check_cache_settings(scene_cache, worker_count)
    index, count = _host(process_index, process_count)
    host_batch = _host_batch(batch_size, count)
    name = parse_mixture(datasets)[0][0]
    join = SceneJoin.open(data_dir, name, split)
    rows = list(range(index, len(join), count))
    # Every host runs the same number of batches (a collective per batch): pad to the longest.
    per_host = max(1, math.ceil(math.ceil(len(join) / count) / host_batch)) * host_batch
    plan = [(i, True) for i in rows] + [(rows[0] if rows else 0, False)] * (per_host - len(rows))
    ds = grain.MapDataset.source(plan).map(lambda p: (name, join[p[0]], p[1]))
    if epochs != 1:
        ds = ds.repeat(epochs, reseed_each_epoch=False)
    fn, encoder = make_preprocess(
        data_dir,
        [name],
        tokenizer,
        loc_bins,
        prompt_templates,
        False,
        num_points=num_points,
        prompt_len=prompt_len,
        answer_len=answer_len,
        features_dtype=features_dtype,
        blind=blind,
        profile=profile,
    )
    return _batch_iterator(
        ds, fn, encoder, seed, host_batch, read_threads, worker_count, mesh, batch_size
    )
