"""TFDS builders for 3D-LLM data: scenes stored once, language records pointing to them.

Two datasets per builder config, written as ArrayRecord (random access, `tfds.data_source`):

  TFDS_DIR/llm3d_scenes/<config>/<version>/    one record per scene (features stored once)
  TFDS_DIR/llm3d_language/<config>/<version>/  one record per language item, with `scene_id`
                                               and `scene_index` = its scene's record index
                                               in the same split of llm3d_scenes/<config>

Both have splits `train` and `validation` (split by scene, so a scene's records and its
features live in the same split). Records are written in key order (`disable_shuffling`), which
is what makes `scene_index` a stable random-access join; grain shuffles at read time.

The builders are not registered with TFDS (`skip_registration`): they need the validated inputs
handed to them by `data_pipeline.tfds.build`, and readers never need them, because TFDS reads
back the written `features.json` / `dataset_info.json` (`tfds.data_source("llm3d_language/scanqa",
data_dir=TFDS_DIR)` or `tfds.builder_from_directory`). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds

from llm3d_jax.data.sources import LANGUAGE_DATASET, SCENE_DATASET

VERSION = tfds.core.Version("1.0.0")
RELEASE_NOTES = {
    "1.0.0": "Scenes (fp16 features as bytes) + language records joined by scene_index."
}

CITATION = """@inproceedings{hong20233dllm,
  title={3D-LLM: Injecting the 3D World into Large Language Models},
  author={Hong, Yining and Zhen, Haoyu and Chen, Peihao and Zheng, Shuhong and Du, Yilun and
          Chen, Zhenfang and Gan, Chuang},
  booktitle={NeurIPS}, year={2023}}"""

TASKS = (
    "caption",
    "dense_caption",
    "qa",
    "grounding",
    "task_decomposition",
    "dialogue",
    "navigation",
    "affordance",
    "object_caption",
)

# `{prompt}` is the record's prompt (location placeholders already in it). Tasks missing from a
# config's table use "{prompt}": the language stage already writes complete instructions for
# them ("Where is the red chair?", ScanRefer's "Find the object: ..."). Questions get the
# BLIP-2 style "Question: ... Answer:" wrapping. The grain pipeline applies them (llm3d_jax.data).
_BASE_TEMPLATES = {"qa": "Question: {prompt} Answer:"}


@dataclasses.dataclass(eq=False)
class Llm3dConfig(tfds.core.BuilderConfig):
    """A data source: which record `source` values it accepts and its default prompt templates."""

    sources: tuple[str, ...] = ()
    prompt_templates: tuple[tuple[str, str], ...] = ()


def _config(name: str, description: str, sources: Iterable[str], **templates: str) -> Llm3dConfig:
    table = {**_BASE_TEMPLATES, **templates}
    return Llm3dConfig(
        name=name,
        version=VERSION,
        release_notes=RELEASE_NOTES,
        description=description,
        sources=tuple(sources),
        prompt_templates=tuple(sorted(table.items())),
    )


CONFIGS = {
    c.name: c
    for c in [
        _config(
            "synthetic",
            "Synthetic rooms with generated language (boxes demonstration, ChatCaptioner, revision, templates).",
            ["boxes_demo", "chatcaptioner", "revision", "template"],
        ),
        _config("scanqa", "ScanQA questions on ScanNet scenes.", ["scanqa"]),
        _config(
            "sqa3d",
            "SQA3D situated questions on ScanNet scenes.",
            ["sqa3d"],
            qa="Situation and question: {prompt} Answer:",  # prompt = "<situation> <question>"
        ),
        _config("scanrefer", "ScanRefer referring expressions on ScanNet scenes.", ["scanrefer"]),
        # The release's prompts are complete instructions ("Human: ... Robot: ..."): no wrapping.
        _config("3dllm", "The 3D-LLM release's language data.", ["3dllm"], qa="{prompt}"),
        _config(
            "3dmv_vqa", "3DMV-VQA questions on HM3D rooms (Hong et al., CVPR 2023).", ["3dmv_vqa"]
        ),
        # One object per scene file; the prompt is the release's whole instruction.
        _config("objaverse", "Objaverse object captions (ChatCaptioner).", ["objaverse"]),
    ]
}


def scene_features(dim: int) -> tfds.features.FeaturesDict:
    """One scene feature file (docs/architecture.md contract), fp16 features stored as raw bytes."""

    def array(shape, dtype):
        return tfds.features.Tensor(shape=shape, dtype=dtype, encoding="bytes")

    return tfds.features.FeaturesDict(
        {
            "scene_id": tfds.features.Text(),
            "points": array((None, 3), np.float32),
            "features": array((None, dim), np.float16),
            "voxels": array((None, 3), np.uint8),
            "colors": array((None, 3), np.uint8),  # [0,3] when the file has none
            "instance": array((None,), np.int32),
            "grid_origin": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "grid_voxel": tfds.features.Tensor(shape=(), dtype=np.float32),
            "object_ids": array((None,), np.int32),
            "object_labels": tfds.features.Tensor(shape=(None,), dtype=np.str_),
            "object_boxes": array((None, 6), np.float32),
            "meta": tfds.features.Text(),  # JSON
        }
    )


def language_features() -> tfds.features.FeaturesDict:
    """One language record (docs/architecture.md contract) + the join index to the scenes split."""
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "scene_id": tfds.features.Text(),
            "scene_index": tfds.features.Tensor(shape=(), dtype=np.int64),
            "task": tfds.features.Text(),
            "prompt": tfds.features.Text(),
            "answers": tfds.features.Tensor(shape=(None,), dtype=np.str_),
            "object_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "source": tfds.features.Text(),
            "meta": tfds.features.Text(),  # JSON
        }
    )


class _SplitsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the (key, example) iterables it is given, one per split, in key order. A split may
    also be a `beam.PTransform` yielding (key, example): TFDS then writes it on Apache Beam, with
    the runner of `download_and_prepare`'s `DownloadConfig(beam_options=...)`
    (data_pipeline/tfds/beam.py)."""

    VERSION = VERSION
    RELEASE_NOTES = RELEASE_NOTES
    BUILDER_CONFIGS = list(CONFIGS.values())

    def __init__(self, *, splits: Mapping[str, Iterable], metadata: dict, **kwargs):
        self._splits = splits
        self._metadata = metadata
        super().__init__(file_format="array_record", **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks beside the builder's code for checksums of downloads; these builders download
        # nothing, and that lookup needs the importlib_resources backport (absent on py3.11).
        return None

    def _features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=self._features(),
            disable_shuffling=True,  # keys are record indices: the scene_index join relies on it
            metadata=tfds.core.MetadataDict(self._metadata),
            citation=CITATION,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # inputs are local and already validated
        return {name: examples for name, examples in self._splits.items()}

    def _generate_examples(self):  # splits come ready-made from _split_generators
        raise NotImplementedError


class UncompressedArrayRecord(tfds.core.ExampleWriter):
    """ArrayRecord shards without compression (TFDS compresses by default): fp16 features barely
    compress (~8%) while decompressing them dominates a scene read. Used in every process that
    writes a shard, Beam workers included."""

    def write(self, path, examples):
        from array_record.python import array_record_module

        writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1,uncompressed")
        for _, serialized in examples:
            writer.write(serialized)
        writer.close()


class Llm3dScenes(_SplitsBuilder, skip_registration=True):
    name = SCENE_DATASET

    def _features(self):
        return scene_features(int(self._metadata["dim"]))

    def _example_writer(self):
        return UncompressedArrayRecord(file_format=self.info.file_format)


class Llm3dLanguage(_SplitsBuilder, skip_registration=True):
    name = LANGUAGE_DATASET

    def _features(self):
        return language_features()
