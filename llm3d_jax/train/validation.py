"""Generation metrics of the periodic validation in experiments/train.py.

Greedy answers to the first `eval_generate_batches` validation batches (prefill + the decoding
loop of `llm3d_jax.infer.generate.generate_fn`, jitted once on the global batch with the training
shardings), scored on the host:
- `val_em`: exact match. With text (tfds data: the answer decoded with the tokenizer, metadata
  from the iterator) the prediction and every reference answer lose their `<box>`/`<pt>` spans
  and are compared after `normalize_answer` (`normalized_exact_match`); rows whose references are
  locations only are not counted. Without text (synthetic batches) the generated ids must equal
  the reference ids wherever `answer_mask` is set; the data pipeline's references end with EOS,
  so there the stop must match too.
- `val_acc25` (only when the batches hold grounding rows): the first predicted box has IoU >= 0.25
  with the first box of the first reference answer.
Each process scores the rows it holds (the metadata of its slice of the batch describes exactly
those); the counts are summed over processes, so every process must call `sum_over_processes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from llm3d_jax import tokens
from llm3d_jax.evaluate.answers import normalized_exact_match, strip_locations
from llm3d_jax.evaluate.grounding import box_iou
from llm3d_jax.infer.decode import DecodeConfig
from llm3d_jax.infer.generate import Answer, decode_answer, generate_fn
from llm3d_jax.train import optimizer, sharding

GENERATION_INPUTS = ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask")
COUNT_KEYS = ("em_hits", "em_count", "acc25_hits", "acc25_count")


def make_generate_step(module: nn.Module, decode_config: DecodeConfig):
    """-> generate_step(params, frozen, batch) -> generated ids int32 [B, max_new_tokens]
    (pad after EOS). Pure: jit it once, with the batch sharding on the batch and the ids."""
    run = generate_fn(module, decode_config)

    def generate_step(params, frozen, batch):
        inputs = {k: batch[k] for k in GENERATION_INPUTS}
        with nn.logical_axis_rules(sharding.RULES):
            ids, _ = run(optimizer.merge(params, frozen), inputs, None)
        return ids

    return generate_step


def text_decoder(tokenizer, llm_config) -> Callable[[np.ndarray, dict], Answer]:
    """-> decode(row_ids, metadata_row) -> Answer: text with boxes in metres on the row's grid.
    `tokenizer` already holds the location tokens at `llm_config.loc_offset`."""

    def decode(row_ids, meta: dict) -> Answer:
        return decode_answer(
            tokenizer,
            row_ids,
            eos_id=llm_config.eos_token_id,
            loc_offset=llm_config.loc_offset,
            loc_bins=llm_config.loc_bins,
            grid_origin=meta["grid_origin"],
            grid_voxel=meta["grid_voxel"],
        )

    return decode


def process_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order of its local data
    (`jax.make_array_from_process_local_data` lays those out by increasing global row). A
    replicated array gives all rows."""
    shards = {}
    for shard in array.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, shard)  # replicas hold the same rows
    return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])


def token_exact_match(generated, answer_ids, answer_mask) -> np.ndarray:
    """bool [B]: generated [B,L] equals answer_ids [B,L] wherever answer_mask [B,L] is set
    (vacuously True for an empty mask: `batch_counts` does not count such padding rows)."""
    mask = np.asarray(answer_mask, bool)
    return np.all((np.asarray(generated) == np.asarray(answer_ids)) | ~mask, axis=1)


def score_answers(rows: Sequence[dict]) -> dict[str, int]:
    """rows: dicts with task, prediction (text), boxes [K,6] (metres), answers (references)
    -> counts (COUNT_KEYS). Grounding rows count towards acc25 when their first reference holds
    a box; other rows towards EM when a reference has text outside location spans."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for row in rows:
        if row["task"] == "grounding":
            try:
                gt = tokens.parse_boxes(row["answers"][0])
            except ValueError:
                continue
            if not len(gt):
                continue
            boxes = np.asarray(row["boxes"], np.float64).reshape(-1, 6)
            iou = float(box_iou(boxes[0], gt[0])) if len(boxes) else 0.0
            counts["acc25_hits"] += iou >= 0.25
            counts["acc25_count"] += 1
            continue
        refs = [strip_locations(a) for a in row["answers"]]
        if not any(refs):
            continue
        counts["em_hits"] += normalized_exact_match(strip_locations(row["prediction"]), refs)
        counts["em_count"] += 1
    return {k: int(v) for k, v in counts.items()}


def batch_counts(generated, batch: dict, metadata: list[dict] | None, decode=None) -> dict:
    """Counts (COUNT_KEYS) of one validation batch, over the rows this process holds.

    generated: ids [B,La] (max_new_tokens = answer_len; a global array sharded like the batch);
    metadata: this process's rows of the batch (`BatchIterator.last_metadata`), or None; decode:
    `text_decoder(...)`, or None. Without both, the rows are scored on tokens (module doc)."""
    ids = process_rows(generated)
    if metadata is None or decode is None:
        mask = process_rows(batch["answer_mask"]).astype(bool)
        hits = token_exact_match(ids, process_rows(batch["answer_ids"]), mask)
        real = mask.any(axis=1)  # batch padding has no answer
        counts = dict.fromkeys(COUNT_KEYS, 0)
        counts.update(em_hits=int(hits[real].sum()), em_count=int(real.sum()))
        return counts
    rows = []
    for row_ids, meta in zip(ids, metadata):
        if not meta["valid"]:
            continue
        answer = decode(row_ids, meta)
        rows.append(
            dict(
                task=meta["task"],
                prediction=answer.text,
                boxes=answer.boxes,
                answers=meta["answers"],
            )
        )
    return score_answers(rows)


def sum_over_processes(counts: Sequence[dict]) -> dict[str, int]:
    """Counts of several batches, summed here and over all processes (a collective: every
    process calls it)."""
    local = np.array([sum(c[k] for c in counts) for k in COUNT_KEYS], np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(local))
        local = gathered.reshape(-1, len(COUNT_KEYS)).sum(axis=0)
    return {k: int(v) for k, v in zip(COUNT_KEYS, local)}


def summarize(counts: dict[str, int]) -> dict[str, float]:
    """-> {"val_em", "val_acc25"} as fractions in [0, 1], each only when something was counted."""
    out = {}
    if counts["em_count"]:
        out["val_em"] = counts["em_hits"] / counts["em_count"]
    if counts["acc25_count"]:
        out["val_acc25"] = counts["acc25_hits"] / counts["acc25_count"]
    return out
