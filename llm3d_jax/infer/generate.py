"""Batched, jit-compiled generation with bucketed shapes, and answers decoded back to metres.

`generate` pads a batch to a power-of-two number of rows (repeating the last row) and its prompt
columns to a power-of-two length (at least 16; trailing all-padding columns are cut first), so
a stream of differently sized requests compiles a handful of programs, not one per request.
The jitted program is prefill + the decoding loop of `llm3d_jax.infer.decode`; the model is seen
only through `model_fns.prefill` / `model_fns.decode_step` (`llm3d_jax.model.llm3d` by default).

`decode_answer` turns generated ids into text: everything after EOS and every special token other
than the location tokens is dropped, location-token runs become `<box>`/`<pt>` placeholders in
metres on the row's scene grid (`llm3d_jax.tokens.tokens_to_placeholders`; malformed runs are
dropped there). Each `<box>`/`<pt>` span is then parsed on its own: one that does not parse (a
box whose min exceeds its max, a span the model spelled out badly) is dropped, and stray tags
elsewhere in the text never cost the valid locations.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import numpy as np

from llm3d_jax import tokens
from llm3d_jax.infer.decode import DecodeConfig, decode

MIN_PROMPT_BUCKET = 16
_PLACEHOLDER = re.compile(r"<(box|pt)>([^<]*)</\1>")


def bucket_size(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def pad_to_buckets(inputs: dict, pad_id: int) -> tuple[dict, int]:
    """Host arrays of one batch -> (the batch padded to bucket shapes, number of real rows).

    inputs: features [B,N,D], voxels [B,N,3], point_mask [B,N], prompt_ids / prompt_mask [B,Lp].
    """
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    rows = len(inputs["prompt_ids"])
    used = int(np.max(np.nonzero(inputs["prompt_mask"].any(0))[0], initial=0)) + 1
    length = bucket_size(used, MIN_PROMPT_BUCKET)
    out = {}
    for key, value in inputs.items():
        if key in ("prompt_ids", "prompt_mask"):
            value = value[:, :length]
            fill = pad_id if key == "prompt_ids" else 0
            value = np.pad(value, ((0, 0), (0, length - value.shape[1])), constant_values=fill)
        out[key] = value
    batch = bucket_size(rows)
    if batch > rows:
        # Copies of a real row, not zeros: an all-masked row could produce NaNs in attention.
        out = {k: np.concatenate([v, np.repeat(v[-1:], batch - rows, 0)]) for k, v in out.items()}
    return out, rows


def generate_fn(module, config: DecodeConfig, model_fns=None):
    """-> run(params, inputs, rng) -> (ids int32 [B, max_new_tokens], scores float32 [B]):
    prefill + the decoding loop on fixed shapes, not jitted (`generate` jits it for host
    batches; experiments/train.py jits it with the shardings of its global validation batches).
    inputs: features, voxels, point_mask, prompt_ids, prompt_mask (module doc)."""
    model_fns = model_fns or default_model_fns()

    def run(params, inputs, rng):
        cache, logits0 = model_fns.prefill(
            module, params, **inputs, max_decode_len=config.max_new_tokens
        )
        step = functools.partial(model_fns.decode_step, module, params)
        return decode(step, cache, logits0, config, rng)

    return run


@functools.lru_cache(maxsize=64)
def _compiled(module, config: DecodeConfig, model_fns):
    return jax.jit(generate_fn(module, config, model_fns))


def default_model_fns():
    from llm3d_jax.model import llm3d

    return llm3d


def generate(
    module, params, inputs: dict, config: DecodeConfig, rng=None, model_fns=None
) -> tuple[np.ndarray, np.ndarray]:
    """-> generated ids int32 [B, max_new_tokens] (pad after EOS) and scores float32 [B].

    inputs: host arrays features, voxels, point_mask, prompt_ids, prompt_mask (module doc).
    rng: a key for strategy="sample" (default key 0).
    """
    model_fns = model_fns or default_model_fns()
    padded, rows = pad_to_buckets(inputs, config.pad_id)
    if rng is None and config.strategy == "sample":
        rng = jax.random.key(0)
    ids, scores = _compiled(module, config, model_fns)(params, padded, rng)
    return np.asarray(ids)[:rows], np.asarray(scores)[:rows]


@dataclasses.dataclass(frozen=True)
class Answer:
    """One generated answer. boxes float32 [K,6] (xmin ymin zmin xmax ymax zmax, metres),
    points float32 [K,3]; `text` holds them as `<box>`/`<pt>` placeholders."""

    text: str
    boxes: np.ndarray
    points: np.ndarray
    token_ids: tuple[int, ...]
    score: float = 0.0

    def first_box(self) -> np.ndarray | None:
        return self.boxes[0] if len(self.boxes) else None


def decode_answer(
    tokenizer,
    token_ids,
    *,
    eos_id: int,
    loc_offset: int,
    loc_bins: int,
    grid_origin,
    grid_voxel,
    score: float = 0.0,
) -> Answer:
    """Generated ids of one row -> Answer (module doc for what is dropped)."""
    ids = [int(i) for i in token_ids]
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    special = set(tokenizer.all_special_ids)
    keep = [
        i
        for i in ids
        if loc_offset <= i < loc_offset + loc_bins or (i not in special and i < loc_offset)
    ]
    raw = tokenizer.decode(keep, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    text = tokens.tokens_to_placeholders(raw, grid_origin, grid_voxel)

    # Parse each well-formed placeholder on its own: stray tags or garbage elsewhere in the
    # generated text must not cost the valid locations.
    boxes, points, kept, end = [], [], [], 0
    for m in _PLACEHOLDER.finditer(text):
        try:
            if m.group(1) == "box":
                boxes.append(tokens.parse_boxes(m.group(0))[0])
            else:
                points.append(tokens.parse_points(m.group(0))[0])
            kept.append(text[end : m.end()])
        except ValueError:  # wrong count, min > max, non-numbers: drop the span
            kept.append(text[end : m.start()])
        end = m.end()
    kept.append(text[end:])
    return Answer(
        text=re.sub(r"\s+", " ", "".join(kept)).strip(),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 6),
        points=np.asarray(points, np.float32).reshape(-1, 3),
        token_ids=tuple(ids),
        score=float(score),
    )


def encode_prompt(encoder, prompt: str, grid_origin, grid_voxel, max_len: int) -> list[int]:
    """A prompt with `<box>`/`<pt>` placeholders -> ids with the tokenizer's special tokens.

    encoder: `llm3d_jax.data.preprocess.TextEncoder`. Unlike training, which truncates, a prompt
    longer than `max_len` tokens is a ValueError: a cut question would be answered wrongly.
    """
    text = tokens.placeholders_to_tokens(prompt, grid_origin, grid_voxel, encoder.loc_bins)
    ids = [
        *encoder.prefix,
        *encoder.tokenizer(text, add_special_tokens=False)["input_ids"],
        *encoder.suffix,
    ]
    if len(ids) > max_len:
        raise ValueError(
            f"the prompt is {len(ids)} tokens, longer than the model's context of {max_len} "
            "prompt tokens"
        )
    return ids
