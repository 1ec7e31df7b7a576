"""Held-out scenes: a pretraining mixture leaves out the rooms of the ScanQA / SQA3D evaluation
annotation files by default (experiments/configs/pretrain_mixture.py), read from the files."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data_pipeline"))
from test_tfds_fixtures import write_fixture  # noqa: E402

from data_pipeline.tfds import build  # noqa: E402
from llm3d_jax import data, tokens  # noqa: E402
from llm3d_jax.data import holdout  # noqa: E402
from llm3d_jax.fileio import InputError, write_jsonl_atomic  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LANGUAGE = os.path.join(REPO, "tests", "fixtures", "language")
SCENES = [f"scene{s:04d}_00" for s in range(4)]
HELD = {"scene0001_00", "scene0002_00"}  # in the evaluation files below


def pretrain_config():
    path = os.path.join(REPO, "experiments", "configs", "pretrain_mixture.py")
    spec = importlib.util.spec_from_file_location("pretrain_mixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def write_annotations(folder) -> None:
    """The default evaluation files: ScanQA lists and SQA3D {"questions": [...]}."""
    os.makedirs(folder)
    files = {
        "ScanQA_v1.0_val.json": [{"scene_id": "scene0001_00", "question": "q", "answers": ["a"]}],
        "ScanQA_v1.0_test_w_obj.json": [{"scene_id": "scene0001_00", "question": "q"}],
        "ScanQA_v1.0_test_wo_obj.json": [{"scene_id": "scene0001_00", "question": "q"}],
        "v1_balanced_questions_val_scannetv2.json": {
            "questions": [{"scene_id": "scene0002_00", "question": "q", "question_id": 1}]
        },
        "v1_balanced_questions_test_scannetv2.json": {
            "questions": [{"scene_id": "scene0002_00", "question": "q", "question_id": 2}]
        },
    }
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """`3dllm` and `scanqa` TFDS configs, every record in train, over the same four scenes."""
    root = str(tmp_path_factory.mktemp("holdout"))
    features, _, _, rows = write_fixture(root, num_scenes=4, records_per_scene=3)
    out = os.path.join(root, "tfds")
    for source in ("3dllm", "scanqa"):
        path = os.path.join(root, f"{source}.jsonl")
        write_jsonl_atomic(
            path,
            [
                {**r, "id": f"{source}-{r['id']}", "source": source, "meta": {"split": "train"}}
                for r in rows
            ],
        )
        build(features, path, out, source)
    texts = [r["prompt"] + " " + " ".join(r["answers"]) for r in rows]
    tok_dir = os.path.join(root, "tok")
    tokens.train_tokenizer(texts, vocab_size=300, out_dir=tok_dir)
    annotations = os.path.join(root, "annotations")
    write_annotations(annotations)
    return out, tok_dir, annotations


def scenes_seen(env, batches=12, **overrides) -> set[str]:
    out, tok_dir, annotations = env
    config = pretrain_config()
    config.data.annotations_dir = annotations
    config.data.update(dict(datasets="3dllm:4,scanqa:1", features_dtype="float32", **overrides))
    config.data.update(dict(num_points=16, prompt_len=16, answer_len=12))
    it = data.make_train_iterator(out, tok_dir, batch_size=4, read_threads=2, **config.data)
    seen = set()
    for _ in range(batches):  # 48 rows: several epochs of what is left
        next(it)
        seen |= {m["scene_id"] for m in it.last_metadata}
    return seen


def test_pretrain_mixture_drops_evaluation_scenes_by_default(env, capsys):
    assert pretrain_config().data.hold_out_eval_scenes  # on unless turned off
    assert scenes_seen(env) == set(SCENES) - HELD
    printed = capsys.readouterr().out
    assert "3dllm: 6 of 12 train records left out" in printed
    assert "scanqa: 6 of 12 train records left out" in printed


def test_the_switch_turns_it_off(env):
    assert scenes_seen(env, hold_out_eval_scenes=False) == set(SCENES)


def test_scenes_come_from_the_annotation_files():
    scanqa = holdout.annotation_scenes(os.path.join(LANGUAGE, "scanqa_val.json"))
    assert scanqa == {"scene0000_00", "scene0001_00", "scene0002_00"}
    sqa3d = holdout.annotation_scenes(os.path.join(LANGUAGE, "sqa3d_questions.json"))
    assert sqa3d == {
        e["scene_id"]
        for e in json.load(open(os.path.join(LANGUAGE, "sqa3d_questions.json")))["questions"]
    }
    paths = holdout.annotation_paths("/ann", "a.json, /abs/b.json")
    assert paths == ["/ann/a.json", "/abs/b.json"]


def test_bad_annotation_files_are_one_line_errors(tmp_path, env):
    with pytest.raises(InputError, match="absent.json: held-out annotation file not found"):
        holdout.held_out_scenes([str(tmp_path / "absent.json")])
    other = tmp_path / "records.json"
    other.write_text(json.dumps([{"question": "no scene"}]))
    with pytest.raises(InputError, match="no entry names a scene_id"):
        holdout.held_out_scenes([str(other)])
    with pytest.raises(InputError, match="hold_out_eval_scenes needs annotation files"):
        holdout.held_out_scenes([])
    with pytest.raises(
        InputError, match="ScanQA_v1.0_val.json: held-out annotation file not found"
    ):
        scenes_seen(env, batches=0, annotations_dir=str(tmp_path))
