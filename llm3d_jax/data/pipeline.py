"""grain pipelines over the TFDS sources, ending in global jax.Arrays on the mesh.

train: per dataset [host slice -> shuffle -> repeat] -> weighted mix -> preprocess (seeded per
       example) -> batch -> threads prefetch -> global arrays. With `profile="release"` the host
       slice is expanded before shuffling into one row per distinct answer of each record (the
       released 3D-LLM's training rows, `preprocess.distinct_answers`).
eval:  one dataset, host slice padded to whole batches (padding rows: `valid` False, no answer
       tokens) -> preprocess -> batch; one pass, or `epochs=None` to cycle.

Slicing happens before shuffling: host i of P reads records i, i+P, i+2P, ... of every dataset,
so hosts are disjoint and together cover each epoch. Everything is index-based (MapDataset), so
the iterator state is one small JSON-able dict and restoring it resumes the exact stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import grain
import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm3d_jax.data import holdout, preprocess
from llm3d_jax.data.sources import SceneJoin, dataset_metadata

BATCH_AXES = ("data", "fsdp")  # the `batch` logical axis (docs/architecture.md)
# float16 is the stored precision: no conversion on the host (the cost at 5000 x 1408); the
# model's first op converts on the device.
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


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
    """

    def __init__(self, dataset: grain.IterDataset, mesh, global_batch: int, loc_offset: int):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self._initial = self._iterator.get_state()
        self.mesh = mesh
        self.global_batch = global_batch
        self.loc_offset = loc_offset
        self.last_metadata: list[dict] = []
        self._sharding = None
        if mesh is not None:
            axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
            self._sharding = NamedSharding(mesh, P(axes or None))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        arrays, self.last_metadata = next(self._iterator)
        if self._sharding is None:
            return arrays
        return {
            k: jax.make_array_from_process_local_data(
                self._sharding, v, (self.global_batch, *v.shape[1:])
            )
            for k, v in arrays.items()
        }

    def get_state(self) -> dict:
        return {"grain": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["grain"])

    def reset(self) -> None:
        """Back to the first batch (e.g. the same validation batches at every evaluation)."""
        self._iterator.set_state(self._initial)


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


def make_preprocess(data_dir, names, tokenizer, loc_bins, prompt_templates, train, **shapes):
    """-> (Preprocess for the datasets `names`, its TextEncoder). Templates: each dataset's
    defaults (its TFDS metadata) updated with `prompt_templates`."""
    templates = {}
    for name in names:
        table = dict(dataset_metadata(data_dir, name).get("prompt_templates", {}))
        table.update(prompt_templates or {})
        templates[name] = table
    encoder = preprocess.TextEncoder.create(load_tokenizer(tokenizer), loc_bins)
    dtype = _DTYPES[shapes.pop("features_dtype")]
    return preprocess.Preprocess(
        encoder, templates, features_dtype=dtype, train=train, **shapes
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


def _batch_iterator(ds, fn, encoder, seed, host_batch, read_threads, mesh, batch_size):
    """(record source, Preprocess) -> host batches read by threads -> global-array iterator."""
    ds = ds.random_map(fn, seed=seed).batch(host_batch, drop_remainder=True, batch_fn=fn.collate)
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    )
    return BatchIterator(ds, mesh, batch_size, encoder.loc_offset)


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
    features_dtype: str = "float32",
    blind: bool = False,
    profile: str = "ours",
    prompt_templates: Mapping[str, str] | None = None,
    read_threads: int = 4,
    process_index: int | None = None,
    process_count: int | None = None,
    hold_out_eval_scenes: bool = False,
    annotations_dir: str = "",
    held_out_annotations: str | Sequence[str] = holdout.EVAL_ANNOTATIONS,
) -> BatchIterator:
    """Endless shuffled training batches of the `train` split (see module doc); `profile`:
    "ours" or "release" (`llm3d_jax.data.preprocess` module doc).

    `hold_out_eval_scenes`: leave out every record whose scene appears in one of the
    `held_out_annotations` files (relative names inside `annotations_dir`; by default ScanQA's
    and SQA3D's validation and test files), counted on stdout per dataset
    (`llm3d_jax.data.holdout`)."""
    index, count = _host(process_index, process_count)
    host_batch = _host_batch(batch_size, count)
    mixture = parse_mixture(datasets)
    held = set()
    if hold_out_eval_scenes:
        paths = holdout.annotation_paths(annotations_dir, held_out_annotations)
        held = holdout.held_out_scenes(paths)
    parts = []
    for k, (name, _) in enumerate(mixture):
        join = SceneJoin.open(data_dir, name, "train")
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
        [n for n, _ in mixture],
        tokenizer,
        loc_bins,
        prompt_templates,
        True,
        num_points=num_points,
        prompt_len=prompt_len,
        answer_len=answer_len,
        features_dtype=features_dtype,
        blind=blind,
        profile=profile,
    )
    return _batch_iterator(mixed, fn, encoder, seed, host_batch, read_threads, mesh, batch_size)


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
    features_dtype: str = "float32",
    blind: bool = False,
    profile: str = "ours",
    prompt_templates: Mapping[str, str] | None = None,
    read_threads: int = 4,
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
    record of the split."""
    del hold_out_eval_scenes, annotations_dir, held_out_annotations
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
    return _batch_iterator(ds, fn, encoder, seed, host_batch, read_threads, mesh, batch_size)
