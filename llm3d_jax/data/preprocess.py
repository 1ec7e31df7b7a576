"""Per-example preprocessing: points sampled or padded with a mask, prompt templates, tokenisation
with location tokens on the scene grid, truncation, and the host-batch collation.

Two profiles (`PROFILES`, the run config's `profile`):
  ours     the prompt through its task template ("Question: ... Answer:"), a random subset of the
           scene's points (or all, zero-padded, the padding masked), one random answer per step.
  release  the released 3D-LLM's inputs (LAVIS `ThreeDVQADataset` with `BlipQuestionProcessor`):
           the bare prompt through `release_question`, the scene's first `num_points` rows
           (`release_points`) with no point mask (the padding is attended to), and one training
           row per distinct answer (`distinct_answers`; the pipeline expands the records).

Point sampling: a subset of `num_points` rows is the rows with the smallest `point_order` under
the example's key (`sample_key`, two uint32 drawn from its seeded rng), in row order. The order
is integer arithmetic that numpy and jax compute bit for bit, so the device scene cache
(`data.scene_cache = "device"`, llm3d_jax.data.scene_cache), which samples inside the jitted
step from the key alone, takes exactly the rows this module takes on the host.

Two batch layouts (`Preprocess.collate`):
  host    `MODEL_KEYS`: the points gathered on the host (features [B,P,D] ...).
  cached  `CACHED_KEYS` (`Preprocess.object_slots` > 0, the scene cache): the scene's index,
          the sampling key and which of the scene's instance ids the record names, besides the
          text; the points are gathered from the cached scenes (`scene_cache`).

Truncation rules (fixed lengths, so the train step compiles once):
  prompt  the tokenizer's own special tokens are kept (T5: trailing `</s>`; BERT/Llama: leading
          ones); the text between them is cut at the end to fit `prompt_len`.
  answer  text tokens + `eos`, cut at the end to fit `answer_len`; `eos` is always kept.
  Neither is ever cut inside a run of location tokens: the whole run goes (a half box is noise).
"""

from __future__ import annotations

import re
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
    # int8 [P]: k > 0 when the point belongs to the k-th object the record names (its object_ids,
    # in the order the prompt names them), else 0
    "point_target",
)


# The cached layout: the points are named, not carried (the text keys are MODEL_KEYS').
CACHED_KEYS = (
    "scene",  # int32 []: the scene's index in the cache (llm3d_jax.data.scene_cache)
    "sample_key",  # uint32 [2]: the point-sampling key (`sample_key`)
    "object_mask",  # int8 [M]: per distinct instance id of the scene, as point_target
    "prompt_ids",
    "prompt_mask",
    "answer_ids",
    "answer_mask",
)

PROFILES = ("ours", "release")

# LAVIS BlipQuestionProcessor (3DLLM_BLIP2-base/lavis/processors/blip_processors.py, the
# `text_processor` of every released fine-tuning and pre-training config): these characters are
# deleted (not replaced by a space; "?" and "," stay), and at most 50 words are kept.
_RELEASE_DROPPED = re.compile(r'[.!"()*#:;~]')
RELEASE_MAX_WORDS = 50
# Our location placeholders ("<box>1.25 ...</box>") hold dots; the release never had them, and
# deleting their dots would change the numbers, so they pass through unchanged.
_PLACEHOLDER = re.compile(r"(<(?:box|pt)>.*?</(?:box|pt)>)", re.DOTALL)


def release_question(text: str, max_words: int = RELEASE_MAX_WORDS) -> str:
    """The released 3D-LLM's prompt text: lower-cased, `.!"()*#:;~` deleted, trailing spaces
    stripped (only spaces, only at the end: no collapse of inner whitespace, unlike LAVIS's
    caption processor), then cut to the first `max_words` of its " "-separated words."""
    parts = _PLACEHOLDER.split(text)  # odd entries are placeholders
    text = "".join(p if i % 2 else _RELEASE_DROPPED.sub("", p.lower()) for i, p in enumerate(parts))
    text = text.rstrip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def distinct_answers(answers) -> list[str]:
    """The answers without repeats, in first-seen order: the released 3D-LLM's training rows of
    one question (its `answer_weight` dict; the weights are computed and never used)."""
    return list(dict.fromkeys(answers))


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


def sample_key(rng: np.random.Generator) -> np.ndarray:
    """uint32 [2]: an example's point-sampling key, drawn from its seeded rng (drawn for every
    example, whether or not its scene has more points than are kept)."""
    return rng.integers(0, 2**32, size=2, dtype=np.uint32)


_MIX1, _MIX2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)


def mix32(x):
    """murmur3's 32-bit finaliser: a bijection of uint32. Plain operators, so numpy and jax
    uint32 arrays give the same bits (both wrap on overflow)."""
    x = x ^ (x >> 16)
    x = x * _MIX1
    x = x ^ (x >> 13)
    x = x * _MIX2
    return x ^ (x >> 16)


def point_order(rows, key0, key1):
    """uint32 sort keys of the uint32 `rows` under an example's key (numpy or jax arrays; the
    key words broadcast against `rows`). A bijection of the row for a fixed key (xor, mix32,
    add, mix32), so distinct rows never tie and any selection of the smallest is unique."""
    return mix32(mix32(rows ^ key0) + key1)


def choose_points(n: int, num_points: int, key: np.ndarray) -> np.ndarray | None:
    """Sorted rows of a random subset when the scene has more than `num_points`, else None (all
    rows, zero-padded): the `num_points` rows with the smallest `point_order` under `key`
    (`sample_key`, seeded per example, so the subset is reproducible)."""
    if n <= num_points:
        return None
    order = point_order(np.arange(n, dtype=np.uint32), key[0], key[1])
    return np.sort(np.argpartition(order, num_points - 1)[:num_points])


def release_points(n: int, num_points: int) -> np.ndarray | None:
    """The released 3D-LLM's rows of a scene with `n` points: `torch.sort(torch.randperm(n)
    [:num_points])[1]` takes the sort *indices* of the drawn rows, a permutation of
    0..num_points-1 whatever the draw, so the first `num_points` rows of the file (taken here in
    file order: the Q-Former does not depend on the points' order); None (all rows,
    zero-padded) when `n <= num_points`."""
    return np.arange(num_points) if n > num_points else None


def fill_points(scene: dict, keep: np.ndarray | None, features, voxels) -> np.ndarray:
    """Writes the chosen points into `features` [P,D] / `voxels` [P,3] (any dtypes, converted in
    the same pass: at 5000 x 1408 the copies are the cost) and returns the mask bool [P]."""
    num_points = len(features)
    if keep is not None:
        features[:] = scene["features"][keep]
        voxels[:] = scene["voxels"][keep]
        return np.ones(num_points, bool)
    n = len(scene["features"])
    features[:n] = scene["features"]
    features[n:] = 0
    voxels[:n] = scene["voxels"]
    voxels[n:] = 0
    return np.arange(num_points) < n


def named_order(instance: np.ndarray, object_ids) -> np.ndarray:
    """int8 like `instance`: k where the value is the k-th of `object_ids` (1-based, the first
    127), else 0."""
    ids = np.asarray(object_ids, np.int64).reshape(-1)[:127]
    instance = np.asarray(instance)
    if not len(ids):
        return np.zeros(instance.shape, np.int8)
    match = instance[..., None] == ids  # [..., K]
    return np.where(match.any(-1), match.argmax(-1) + 1, 0).astype(np.int8)


def target_points(scene: dict, keep: np.ndarray | None, object_ids, num_points: int) -> np.ndarray:
    """int8 [P]: k > 0 where the chosen point (as `fill_points` lays them out) belongs to the k-th
    of `object_ids` (the scene's per-point `instance`); 0 elsewhere, on padding and for a record
    that names no object. What `LLM3DConfig.target_tokens`' point ratings learn to pick (any
    k), and its `object_roles` (the k-th)."""
    out = np.zeros(num_points, np.int8)
    if len(object_ids):
        instance = scene["instance"] if keep is None else scene["instance"][keep]
        out[: len(instance)] = named_order(instance, object_ids)
    return out


def sample_points(
    scene: dict, num_points: int, rng: np.random.Generator, dtype=np.float32, profile="ours"
):
    """-> features `dtype` [P,D], voxels int32 [P,3], mask bool [P] for one scene (P = num_points).

    More points than `num_points`: a random subset; fewer: all of them, zero-padded, mask False
    on the padding. Release profile: the first `num_points` rows, mask all True. (The pipeline
    does the same per batch row, in `Preprocess.collate`.)
    """
    features = np.empty((num_points, scene["features"].shape[1]), dtype)
    voxels = np.empty((num_points, 3), np.int32)
    n = len(scene["features"])
    if profile == "release":
        fill_points(scene, release_points(n, num_points), features, voxels)
        return features, voxels, np.ones(num_points, bool)
    keep = choose_points(n, num_points, sample_key(rng))
    return features, voxels, fill_points(scene, keep, features, voxels)


@dataclass(frozen=True)
class Preprocess:
    """(config name, (record, scene), valid) -> one example: model arrays + host metadata."""

    encoder: TextEncoder
    templates: dict  # config name -> {task: template}
    num_points: int
    prompt_len: int
    answer_len: int
    features_dtype: object
    # train: the record's `answer_index`-th distinct answer when the pipeline set one (release
    # profile), else a random answer; eval: the first
    train: bool
    # The blind baseline: zero features and voxels (point mask kept), so the model sees the
    # prompt only; it shows what the 3D input adds, with everything else the same.
    blind: bool = False
    profile: str = "ours"  # a name of PROFILES (module doc)
    # > 0: the scenes are cached (llm3d_jax.data.scene_cache): examples come in the cached
    # layout (module doc) and `object_mask` has this width (the most distinct instance ids of
    # a cached scene). 0: the host layout.
    object_slots: int = 0

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"profile {self.profile!r} is not one of {PROFILES}")

    def __call__(self, item, rng: np.random.Generator) -> dict:
        name, (record, scene), valid = item
        origin, voxel = scene["grid_origin"], scene["grid_voxel"]
        release = self.profile == "release"
        if release:
            prompt = release_question(record["prompt"])
        else:
            template = self.templates[name].get(record["task"], "{prompt}")
            prompt = apply_template(template, record["prompt"])
        answers = record["answers"]
        if "answer_index" in record:
            answer = distinct_answers(answers)[record["answer_index"]]
        elif self.train:
            answer = answers[int(rng.integers(len(answers)))]
        else:
            answer = answers[0]
        key = sample_key(rng)
        if self.object_slots:  # the scene's points stay in the cache: name them
            named = np.zeros(self.object_slots, np.int8)
            ids = scene["instance_ids"]
            named[: len(ids)] = named_order(ids, record["object_ids"])
            points = {"scene": np.int32(scene["index"]), "sample_key": key, "object_mask": named}
        else:
            # Gathered straight into the batch array by `collate`: no per-example copy.
            points = {"points": (scene, self.keep(len(scene["features"]), key))}
        prompt_ids = self.encoder.prompt(
            tokens.placeholders_to_tokens(prompt, origin, voxel, self.encoder.loc_bins),
            self.prompt_len,
        )
        answer_ids = self.encoder.answer(
            tokens.placeholders_to_tokens(answer, origin, voxel, self.encoder.loc_bins),
            self.answer_len,
        )
        return {
            **points,
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

    def keep(self, n: int, key: np.ndarray) -> np.ndarray | None:
        """The rows of a scene of `n` points this example takes (None: all, zero-padded)."""
        if self.profile == "release":
            return release_points(n, self.num_points)
        return choose_points(n, self.num_points, key)

    def collate(self, examples: list[dict]) -> tuple[dict, list[dict]]:
        """Examples -> (host arrays {key: [b, ...]}, metadata list in row order): `MODEL_KEYS`,
        or `CACHED_KEYS` when the scenes are cached."""
        metadata = [e["meta"] for e in examples]
        if self.object_slots:
            return {k: np.stack([e[k] for e in examples]) for k in CACHED_KEYS}, metadata
        b, dim = len(examples), examples[0]["points"][0]["features"].shape[1]
        features = np.empty((b, self.num_points, dim), self.features_dtype)
        voxels = np.empty((b, self.num_points, 3), np.int32)
        point_mask = np.stack(
            [fill_points(*e["points"], features[i], voxels[i]) for i, e in enumerate(examples)]
        )
        if self.profile == "release":
            point_mask[:] = True  # the release attends to the zero padding too
        if self.blind:
            features[:] = 0
            voxels[:] = 0
        point_target = np.stack(
            [
                target_points(*e["points"], e["meta"]["object_ids"], self.num_points)
                for e in examples
            ]
        )
        arrays = {
            "features": features,
            "voxels": voxels,
            "point_mask": point_mask,
            "point_target": point_target,
        }
        arrays.update(
            {k: np.stack([e[k] for e in examples]) for k in MODEL_KEYS if k not in arrays}
        )
        return arrays, metadata


def _pad(ids: list[int], length: int, pad_id: int) -> np.ndarray:
    out = np.full(length, pad_id, np.int32)
    out[: len(ids)] = ids
    return out
