"""Per-example preprocessing: points sampled or padded with a mask, prompt templates, tokenisation
with location tokens on the scene grid, truncation, and the host-batch collation.

Truncation rules (fixed lengths, so the train step compiles once):
  prompt  the tokenizer's own special tokens are kept (T5: trailing `</s>`; BERT/Llama: leading
          ones); the text between them is cut at the end to fit `prompt_len`.
  answer  text tokens + `eos`, cut at the end to fit `answer_len`; `eos` is always kept.
  Neither is ever cut inside a run of location tokens: the whole run goes (a half box is noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm3d_jax import tokens

MODEL_KEYS = (
    "features",
    "voxels",
    "point_mask",
    "prompt_ids",
    "prompt_mask",
    "answer_ids",
    "answer_mask",
)


def apply_template(template: str, prompt: str) -> str:
    """`template` with `{prompt}` replaced (plain replace: prompts may hold braces)."""
    return template.replace("{prompt}", prompt)


def cut_outside_runs(ids: list[int], max_len: int, is_loc) -> list[int]:
    """The first `max_len` ids, shortened further so that no location-token run is split."""
    if len(ids) <= max_len:
        return ids
    cut = max(max_len, 0)
    while cut > 0 and is_loc(ids[cut - 1]) and is_loc(ids[cut]):
        cut -= 1
    return ids[:cut]


@dataclass(frozen=True)
class TextEncoder:
    """Turns prompt/answer text (with `<box>`/`<pt>` placeholders) into fixed-length id rows."""

    tokenizer: object
    loc_offset: int
    loc_bins: int
    prefix: tuple[int, ...]  # special tokens the tokenizer puts before / after a text
    suffix: tuple[int, ...]
    eos_id: int
    pad_id: int

    @classmethod
    def create(cls, tokenizer, loc_bins: int) -> TextEncoder:
        loc_offset = tokens.add_location_tokens(tokenizer, loc_bins)
        if tokenizer.eos_token_id is None and tokenizer.sep_token_id is None:
            raise ValueError("the tokenizer has neither an eos nor a sep token to end answers")
        eos = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        body = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer("x")["input_ids"]
        start = next(i for i in range(len(full)) if full[i : i + len(body)] == body)
        return cls(
            tokenizer,
            loc_offset,
            loc_bins,
            tuple(full[:start]),
            tuple(full[start + len(body) :]),
            int(eos),
            int(pad),
        )

    def is_loc(self, i: int) -> bool:
        return self.loc_offset <= i < self.loc_offset + self.loc_bins

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, text: str, max_len: int) -> list[int]:
        room = max_len - len(self.prefix) - len(self.suffix)
        return [*self.prefix, *cut_outside_runs(self._ids(text), room, self.is_loc), *self.suffix]

    def answer(self, text: str, max_len: int) -> list[int]:
        return [*cut_outside_runs(self._ids(text), max_len - 1, self.is_loc), self.eos_id]


def sample_points(scene: dict, num_points: int, rng: np.random.Generator, dtype=np.float32):
    """-> features `dtype` [P,D], voxels int32 [P,3], mask bool [P] with P = num_points.

    More points than `num_points`: a random subset (rng is seeded per example); fewer: all of
    them, zero-padded, mask False on the padding. Features are converted from the stored fp16 in
    the same pass that gathers or pads them (at 5000 x 1408 the copies are the cost).
    """
    stored = scene["features"]
    n = len(stored)
    features = np.zeros((num_points, stored.shape[1]), dtype)
    voxels = np.zeros((num_points, 3), np.int32)
    if n > num_points:
        keep = np.sort(rng.choice(n, num_points, replace=False))
        features[:] = stored[keep]
        voxels[:] = scene["voxels"][keep]
        return features, voxels, np.ones(num_points, bool)
    features[:n] = stored
    voxels[:n] = scene["voxels"]
    return features, voxels, np.arange(num_points) < n


@dataclass(frozen=True)
class Preprocess:
    """(config name, (record, scene), valid) -> one example: model arrays + host metadata."""

    encoder: TextEncoder
    templates: dict  # config name -> {task: template}
    num_points: int
    prompt_len: int
    answer_len: int
    features_dtype: object
    train: bool  # train: a random answer of the record; eval: the first

    def __call__(self, item, rng: np.random.Generator) -> dict:
        name, (record, scene), valid = item
        origin, voxel = scene["grid_origin"], scene["grid_voxel"]
        template = self.templates[name].get(record["task"], "{prompt}")
        prompt = apply_template(template, record["prompt"])
        answers = record["answers"]
        answer = answers[int(rng.integers(len(answers)))] if self.train else answers[0]
        prompt_ids = self.encoder.prompt(
            tokens.placeholders_to_tokens(prompt, origin, voxel, self.encoder.loc_bins),
            self.prompt_len,
        )
        answer_ids = self.encoder.answer(
            tokens.placeholders_to_tokens(answer, origin, voxel, self.encoder.loc_bins),
            self.answer_len,
        )
        features, voxels, point_mask = sample_points(
            scene, self.num_points, rng, self.features_dtype
        )
        return {
            "features": features,
            "voxels": voxels,
            "point_mask": point_mask,
            "prompt_ids": _pad(prompt_ids, self.prompt_len, self.encoder.pad_id),
            "prompt_mask": np.arange(self.prompt_len) < len(prompt_ids),
            "answer_ids": _pad(answer_ids, self.answer_len, self.encoder.pad_id),
            # Padding rows of an eval batch carry no answer, so they add nothing to a loss.
            "answer_mask": (np.arange(self.answer_len) < len(answer_ids)) & valid,
            "meta": {
                "id": record["id"],
                "scene_id": record["scene_id"],
                "dataset": name,
                "task": record["task"],
                "prompt": prompt,
                "answers": list(answers),
                "object_ids": record["object_ids"].tolist(),
                "grid_origin": np.asarray(origin, np.float32).tolist(),
                "grid_voxel": float(voxel),
                "valid": bool(valid),
            },
        }


def _pad(ids: list[int], length: int, pad_id: int) -> np.ndarray:
    out = np.full(length, pad_id, np.int32)
    out[: len(ids)] = ids
    return out


def collate(examples: list[dict]) -> tuple[dict, list[dict]]:
    """Examples -> (host arrays {key: [b, ...]}, metadata list in row order)."""
    arrays = {k: np.stack([e[k] for e in examples]) for k in MODEL_KEYS}
    return arrays, [e["meta"] for e in examples]
