"""Input pipeline: TFDS ArrayRecord (`python -m data_pipeline.tfds`) -> grain -> global jax.Arrays.

Entry points (all keyword options also accepted from a config's `data` ConfigDict via `**`):

    make_train_iterator(data_dir, tokenizer=None, mesh=None, *, batch_size, seed=0,
                        datasets="synthetic", num_points=5000, prompt_len=64, answer_len=40,
                        loc_bins=256, features_dtype="float16", profile="ours",
                        prompt_templates=None, read_threads=4, worker_count=0,
                        scene_cache="host", scene_cache_budget_gb=4.0, process_index=None,
                        process_count=None, hold_out_eval_scenes=False, annotations_dir="",
                        held_out_annotations=holdout.EVAL_ANNOTATIONS) -> BatchIterator
    make_eval_iterator(data_dir, tokenizer=None, mesh=None, *, batch_size, seed=0,
                       datasets="synthetic", split="validation", epochs=1, <same shape options>)

- `data_dir`: the TFDS_DIR written by `python -m data_pipeline.tfds`.
- `tokenizer`: a HF tokenizer object or a local tokenizer directory; it gains `<loc0..B-1>`
  (idempotent, `llm3d_jax.tokens.add_location_tokens`); `BatchIterator.loc_offset` is the id of
  `<loc0>`, the model's `loc_offset`.
- `mesh`: a `jax.sharding.Mesh`; batches come back as global jax.Arrays sharded over the mesh's
  ('data', 'fsdp') axes along the batch dimension (`jax.make_array_from_process_local_data`).
  `mesh=None`: this host's numpy rows (tests, benchmarks).
- `batch_size`: GLOBAL batch size, divided evenly over the processes.
- `datasets`: builder configs with mixture weights, "scanqa:2,sqa3d:1" (a str, dict or list);
  eval uses the first.
- `profile`: "ours" (task templates, random point subsets with a padding mask, a random answer
  per record) or "release" (the released 3D-LLM's inputs: the bare processed question, the first
  `num_points` rows unmasked, one training row per distinct answer); `data/preprocess.py`.
- `prompt_templates`: {task: template with `{prompt}`} overriding the datasets' defaults
  (unused by the release profile).
- `hold_out_eval_scenes`: train only; leave out the records of every scene named in the
  `held_out_annotations` files (ScanQA / SQA3D validation and test; `llm3d_jax.data.holdout`).
  The eval iterator accepts and ignores the three hold-out options.
- `worker_count`: grain worker processes for the per-example work (0: reader threads only).
- `scene_cache`: "host" or "device" (train only; `llm3d_jax.data.scene_cache`): the split's scenes
  read once and put on `mesh` (or kept in host RAM above `scene_cache_budget_gb` GiB per device);
  then `next(it)` gives the cached layout (below) and `it.scene_cache` the device arrays.
- `process_index` / `process_count`: default `jax.process_index()` / `jax.process_count()`.

`next(it)` -> {"features" [B,N,D] float16|bfloat16|float32 (`features_dtype`; float16, the
default, is the stored precision and skips the host conversion that dominates at 5000 x 1408),
"voxels" int32 [B,N,3], "point_mask" bool [B,N], "prompt_ids" int32 [B,Lp], "prompt_mask" bool
[B,Lp], "answer_ids" int32 [B,La] (ends with eos; the model shifts it right for the T5 decoder),
"answer_mask" bool [B,La], "point_target" int8 [B,N]}: the model's keywords plus the points of
the objects the record names (k > 0: the k-th object the record names). With the device scene
cache: {"scene" int32 [B], "sample_key" uint32 [B,2], "object_mask" int8 [B,M], and the four
text arrays};
`scene_cache.model_batch(it.scene_cache.arrays, batch, it.scene_cache.spec)` (inside jit) turns
it into the former, bit for bit. `it.last_metadata`: this host's rows' {id, scene_id, dataset,
task, prompt, answers, object_ids, grid_origin, grid_voxel, valid}. `it.get_state()` /
`it.set_state(s)`: JSON-able, exact resume; `it.reset()`: back to the start; `it.sent_bytes`:
bytes handed host -> device so far; `it.close()`: stops its threads and worker processes.
"""

from llm3d_jax.data.pipeline import BatchIterator, make_eval_iterator, make_train_iterator

__all__ = ["BatchIterator", "make_eval_iterator", "make_train_iterator"]
