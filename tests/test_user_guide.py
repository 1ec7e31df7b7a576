"""docs/user-guide.md runs: every ```bash block of the guide, in order, on the committed fixtures.

The guide's first bash block is its settings (`export NAME=value` lines only); it is replaced by
the values below, which point at the fixtures and shrink the sizes. The fixtures:
- SCANS: tests/fixtures/scannet (one tiny ScanNet-format scan, scene0000_00);
- BLIP2: tests/goldens/qformer/blip2_tiny with a tokenizer (tests/train/lavis_base.py): the base
  directory of CKPT, tests/goldens/lavis/lavis_tiny.pth, and a BLIP-2 vision model of 24-d
  features, which is what the checkpoint's Q-Former reads;
- the language files of tests/fixtures/language. The test makes the train files from the val
  ones (question and annotation ids renamed, so the joined records stay distinct), keeps
  SCANQA_VAL to the entries of the one scan (the evaluator needs a prediction for every entry),
  and points the ScanRefer entries at the scan's chair and table (the committed fixture names
  objects of another scene0000_00).
Each block runs under `bash -euo pipefail` with JAX_PLATFORMS=cpu and must exit 0; then every
file the test expects exists and is named in the guide. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.train.lavis_base import LAVIS, REPO, make_base

GUIDE = os.path.join(REPO, "docs", "user-guide.md")
LANGUAGE = os.path.join(REPO, "tests", "fixtures", "language")
SCENE = "scene0000_00"
SIZES = dict(VIEWS="2", WIDTH="64", HEIGHT="48", POINTS="512", STEPS="2", BATCH="2")

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
_EXPORT = re.compile(r"^export\s+(.*?)\s*(?:#.*)?$")

# what the guide says is written, relative to $OUT
EXPECTED = [
    f"scenes/{SCENE}.npz",
    f"scenes/views/{SCENE}.npz",
    f"scenes/views/{SCENE}.png",
    f"features/{SCENE}.npz",
    *(f"records/{d}{s}.jsonl" for d in ("scanqa", "sqa3d", "scanrefer") for s in ("_train", "_val", "")),
    "records/scanqa_train.stats.json",
    "records/scanqa_train.lengths.png",
    *(f"tfds/build_report.{d}.json" for d in ("scanqa", "sqa3d", "scanrefer")),
    *(f"tfds/llm3d_{k}/{d}/1.0.0" for k in ("scenes", "language") for d in ("scanqa", "sqa3d", "scanrefer")),
    "run/config.json",
    "run/metrics.jsonl",
    "run/loss.png",
    "run/tensorboard",
    "run/checkpoints",
    "run/eval/predictions.jsonl",
    "run/eval/metrics.json",
    "run/eval/metrics.md",
    "model/params",
    "model/llm3d_config.json",
    "model/tokenizer.json",
    "questions.jsonl",
    "answers.jsonl",
]  # fmt: skip


def bash_blocks(text: str) -> list[str]:
    return [body for lang, body in _BLOCK.findall(text) if lang == "bash"]


def settings_names(block: str) -> list[str]:
    """The variable names of the settings block; every line is `export NAME=value ...`."""
    names = []
    for line in block.strip().splitlines():
        m = _EXPORT.match(line.strip())
        assert m, f"not an export line in the settings block: {line!r}"
        names += [part.split("=", 1)[0] for part in m.group(1).split()]
    return names


def _dump(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return path


def _load(name):
    with open(os.path.join(LANGUAGE, name), encoding="utf-8") as f:
        return json.load(f)


def fixture_settings(tmp) -> dict:
    inputs = os.path.join(tmp, "inputs")
    os.makedirs(inputs)
    scanqa = _load("scanqa_val.json")
    train = [dict(e, question_id=e["question_id"].replace("val-", "train-")) for e in scanqa]
    questions, annotations = _load("sqa3d_questions.json"), _load("sqa3d_annotations.json")
    shift = lambda entries: [dict(e, question_id=e["question_id"] + 10**6) for e in entries]  # noqa: E731
    refer = [e for e in _load("scanrefer_val.json") if e["scene_id"] == SCENE]
    refer = [
        dict(e, object_id=str(i % 2), object_name=("chair", "table")[i % 2])
        for i, e in enumerate(refer)
    ]
    refer_train = [dict(e, ann_id=str(100 + int(e["ann_id"]))) for e in refer]
    return dict(
        SCANS=os.path.join(REPO, "tests", "fixtures", "scannet"),
        BLIP2=make_base(os.path.join(tmp, "blip2")),
        CKPT=os.path.join(LAVIS, "lavis_tiny.pth"),
        SCANQA_TRAIN=_dump(train, os.path.join(inputs, "scanqa_train.json")),
        SCANQA_VAL=_dump(
            [e for e in scanqa if e["scene_id"] == SCENE], os.path.join(inputs, "scanqa_val.json")
        ),
        SQA3D_TRAIN_Q=_dump(
            dict(questions, questions=shift(questions["questions"])),
            os.path.join(inputs, "sqa3d_train_q.json"),
        ),
        SQA3D_TRAIN_A=_dump(
            dict(annotations, annotations=shift(annotations["annotations"])),
            os.path.join(inputs, "sqa3d_train_a.json"),
        ),
        SQA3D_VAL_Q=os.path.join(LANGUAGE, "sqa3d_questions.json"),
        SQA3D_VAL_A=os.path.join(LANGUAGE, "sqa3d_annotations.json"),
        SCANREFER_TRAIN=_dump(refer_train, os.path.join(inputs, "scanrefer_train.json")),
        SCANREFER_VAL=_dump(refer, os.path.join(inputs, "scanrefer_val.json")),
        OUT=os.path.join(tmp, "out"),
        **SIZES,
    )


def _env(settings) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **settings)
    env.pop("PYTHONPATH", None)  # the commands make the repository importable themselves
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return env


def test_blocks_parse():
    blocks = bash_blocks(open(GUIDE, encoding="utf-8").read())
    assert len(blocks) >= 9
    names = settings_names(blocks[0])
    assert len(names) == len(set(names))
    for body in blocks[1:]:
        assert not body.lstrip().startswith("export"), "settings belong in the first block"


@pytest.mark.slow
def test_every_command_of_the_guide_runs(tmp_path):
    text = open(GUIDE, encoding="utf-8").read()
    blocks = bash_blocks(text)
    settings = fixture_settings(str(tmp_path))
    assert sorted(settings_names(blocks[0])) == sorted(settings), "guide and test settings differ"
    env = _env(settings)
    for body in blocks[1:]:
        start = time.time()
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", body],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        print(f"{time.time() - start:5.1f}s  {body.splitlines()[0]}")
        assert proc.returncode == 0, (
            f"{body}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    out = settings["OUT"]
    for rel in EXPECTED:
        assert os.path.exists(os.path.join(out, rel)), rel
        assert f"$OUT/{rel.split('/')[0]}" in text, rel  # the guide names where it lands
    answers = [json.loads(line) for line in open(os.path.join(out, "answers.jsonl"))]
    assert [a["id"] for a in answers] == ["q1", "q2"] and all("answer" in a for a in answers)
    metrics = json.load(open(os.path.join(out, "run", "eval", "metrics.json")))
    assert metrics
