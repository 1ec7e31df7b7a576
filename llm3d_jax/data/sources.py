"""Random-access sources over the TFDS datasets written by `python -m data_pipeline.tfds`.

A language record names its scene by `scene_id` and `scene_index`, the scene's record index in
the same split of `llm3d_scenes/<config>`; `SceneJoin` reads that record (and checks the id).
Strings come back from TFDS as bytes; `language_record` / `scene_record` return plain str.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

SCENE_DATASET = "llm3d_scenes"
LANGUAGE_DATASET = "llm3d_language"


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(values) -> list[str]:
    return [_text(v) for v in values]


def open_source(data_dir: str, dataset: str, config: str, split: str):
    """`tfds.data_source` of `<dataset>/<config>` in `data_dir`; a clear error when it is missing."""
    import tensorflow_datasets as tfds

    name = f"{dataset}/{config}"
    if not os.path.isdir(os.path.join(data_dir, dataset, config)):
        raise FileNotFoundError(
            f"{data_dir}: no TFDS dataset {name} (build it with python -m data_pipeline.tfds)"
        )
    builder = tfds.builder(name, data_dir=data_dir)
    if split not in builder.info.splits:
        raise ValueError(
            f"{data_dir}: {name} has no split {split!r} (has {list(builder.info.splits)})"
        )
    return tfds.data_source(name, data_dir=data_dir, split=split)


def dataset_metadata(data_dir: str, config: str) -> dict:
    """The language dataset's metadata (prompt templates, dim, build settings)."""
    import tensorflow_datasets as tfds

    return dict(tfds.builder(f"{LANGUAGE_DATASET}/{config}", data_dir=data_dir).info.metadata)


def language_record(raw: dict) -> dict:
    """A decoded TFDS language record with str fields and parsed `meta`."""
    return {
        "id": _text(raw["id"]),
        "scene_id": _text(raw["scene_id"]),
        "scene_index": int(raw["scene_index"]),
        "task": _text(raw["task"]),
        "prompt": _text(raw["prompt"]),
        "answers": _texts(raw["answers"]),
        "object_ids": np.asarray(raw["object_ids"], np.int32),
        "source": _text(raw["source"]),
        "meta": json.loads(_text(raw["meta"])),
    }


def scene_record(raw: dict) -> dict:
    """A decoded TFDS scene record: arrays as stored, str ids/labels, `meta` as a JSON string."""
    out = dict(raw)
    out["scene_id"] = _text(raw["scene_id"])
    out["object_labels"] = np.asarray(_texts(raw["object_labels"]), dtype=np.str_)
    out["meta"] = _text(raw["meta"])
    out["grid_voxel"] = np.float32(raw["grid_voxel"])
    return out


def _matching(record: dict, scene: dict) -> tuple[dict, dict]:
    """-> (record, scene), or ValueError when the record's scene_index holds another scene."""
    if scene["scene_id"] != record["scene_id"]:
        raise ValueError(
            f"record {record['id']}: scene_index {record['scene_index']} holds "
            f"{scene['scene_id']}, not {record['scene_id']} (rebuild the TFDS data)"
        )
    return record, scene


@dataclass(frozen=True)
class SceneJoin:
    """Language records of one config and split, each joined with its scene record."""

    language: object  # tfds data source (random access, len)
    scenes: object

    @classmethod
    def open(cls, data_dir: str, config: str, split: str) -> SceneJoin:
        return cls(
            open_source(data_dir, LANGUAGE_DATASET, config, split),
            open_source(data_dir, SCENE_DATASET, config, split),
        )

    def __len__(self) -> int:
        return len(self.language)

    def answers(self, index: int) -> list[str]:
        """The answers of language record `index` (its scene is not read)."""
        return _texts(self.language[index]["answers"])

    def __getitem__(self, index: int) -> tuple[dict, dict]:
        record = language_record(self.language[index])
        scene = scene_record(self.scenes[record["scene_index"]])
        return _matching(record, scene)


@dataclass(frozen=True)
class CachedJoin:
    """Language records of one config and split, each joined with the small host-side facts of
    its scene (`data.scene_cache`: the points are in the cache, llm3d_jax.data.scene_cache);
    the scene record itself is never read per example. `index` is a
    `scene_cache.SceneIndex` and `offset` the cache index of this config's first scene."""

    language: object  # tfds data source (random access, len)
    index: object
    offset: int

    def __len__(self) -> int:
        return len(self.language)

    def answers(self, index: int) -> list[str]:
        return _texts(self.language[index]["answers"])

    def __getitem__(self, index: int) -> tuple[dict, dict]:
        record = language_record(self.language[index])
        scene = self.index.scene(self.offset + record["scene_index"])
        return _matching(record, scene)
