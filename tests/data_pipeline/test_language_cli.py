"""`python -m data_pipeline.language`: outputs, split by scene, stats, resume, dedupe, bad input."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import data_pipeline.language.__main__ as cli
from data_pipeline.language import offline
from data_pipeline.language.records import read_records
from data_pipeline.render import render_scene
from data_pipeline.scenes.synthetic import make_scene
from llm3d_jax.fileio import InputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    for i in range(5):
        make_scene(21, i).save(d)
    return d


def test_offline_run_writes_records_split_and_stats(scenes, tmp_path):
    out = tmp_path / "records.jsonl"
    assert cli.main(["--scenes", str(scenes), "--out", str(out), "--val-fraction", "0.2"]) == 0
    records, problems = read_records(out, known_scenes={f"synth_{i:04d}" for i in range(5)})
    assert problems == [] and len(records) > 100
    # every task of a room (object_caption is for scene files holding one object)
    assert {r["task"] for r in records} == set(cli.TASKS) - set(offline.OBJECT_TASKS)
    split = {}
    for r in records:  # whole scenes go to one split
        assert split.setdefault(r["scene_id"], r["meta"]["split"]) == r["meta"]["split"]
    assert sorted(split.values()) == ["train"] * 4 + ["val"]
    stats = json.loads((tmp_path / "records.stats.json").read_text())
    assert stats["records"] == len(records) and stats["scenes"] == 5
    assert sum(stats["per_task"].values()) == len(records) and stats["per_source"] == {
        "template": len(records)
    }
    assert stats["per_split"]["val"] == sum(r["meta"]["split"] == "val" for r in records)
    assert sum(stats["answer_words"]["counts"]) == len(records)
    with Image.open(tmp_path / "records.lengths.png") as png:
        assert png.size[0] > 300
    assert sorted(os.listdir(tmp_path)) == [
        "records.jsonl",
        "records.lengths.png",
        "records.stats.json",
    ]


def test_resume_after_a_crash_gives_the_uninterrupted_output(scenes, tmp_path, monkeypatch):
    clean = tmp_path / "clean.jsonl"
    assert cli.main(["--scenes", str(scenes), "--out", str(clean)]) == 0
    real, calls = cli.offline.generate, []

    def crashing(scene, *args):
        calls.append(scene.scene_id)
        if scene.scene_id == "synth_0003":
            raise RuntimeError("killed")
        return real(scene, *args)

    monkeypatch.setattr(cli.offline, "generate", crashing)
    out = tmp_path / "run.jsonl"
    with pytest.raises(RuntimeError, match="killed"):
        cli.main(["--scenes", str(scenes), "--out", str(out)])
    assert not out.exists()
    partial = str(out) + ".partial"
    with open(partial, "a") as f:  # the crash also cut a line of a scene in half
        f.write('{"id": "template-synth_0003-abc", "scene_id": "synth_0003", "ta')
    calls.clear()
    monkeypatch.setattr(
        cli.offline, "generate", lambda scene, *a: calls.append(scene.scene_id) or real(scene, *a)
    )
    assert cli.main(["--scenes", str(scenes), "--out", str(out)]) == 0
    assert calls == ["synth_0003", "synth_0004"]  # finished scenes are not redone
    assert out.read_text() == clean.read_text()
    assert not os.path.exists(partial)


def test_partial_from_other_options_is_refused(scenes, tmp_path):
    out = tmp_path / "r.jsonl"
    (tmp_path / "r.jsonl.partial").write_text(
        json.dumps({"_run": {"procedure": "boxes_demo"}}) + "\n"
    )
    with pytest.raises(InputError, match="written by a run with other options"):
        cli.main(["--scenes", str(scenes), "--out", str(out)])


def test_duplicates_are_dropped(scenes, tmp_path):
    once, twice = tmp_path / "once.jsonl", tmp_path / "twice.jsonl"
    base = ["--scenes", str(scenes), "--procedure", "boxes_demo"]
    assert cli.main(base + ["--temperatures", "0.2", "--out", str(once)]) == 0
    assert cli.main(base + ["--temperatures", "0.2,0.2", "--out", str(twice)]) == 0
    assert once.read_text() == twice.read_text()
    stats = json.loads((tmp_path / "twice.stats.json").read_text())
    assert stats["duplicates_dropped"] == len(once.read_text().splitlines())


def test_a_bad_scene_file_is_reported_and_skipped(scenes, tmp_path, capsys):
    d = tmp_path / "scenes"
    d.mkdir()
    for name in ("synth_0000.npz", "synth_0001.npz"):
        (d / name).write_bytes((scenes / name).read_bytes())
    (d / "broken.npz").write_bytes(b"not a zip file")
    out = tmp_path / "r.jsonl"
    assert cli.main(["--scenes", str(d), "--out", str(out)]) == 0
    assert "broken.npz: not a readable .npz file" in capsys.readouterr().err
    records, _ = read_records(out)
    assert {r["scene_id"] for r in records} == {"synth_0000", "synth_0001"}
    stats = json.loads((tmp_path / "r.stats.json").read_text())
    assert list(stats["skipped_scenes"]) == ["broken"]


def test_revision_and_chatcaptioner_from_the_command_line(scenes, tmp_path):
    captions = tmp_path / "captions.jsonl"
    assert (
        cli.main(
            ["--scenes", str(scenes), "--tasks", "caption,dense_caption", "--out", str(captions)]
        )
        == 0
    )
    revised = tmp_path / "revised.jsonl"
    assert (
        cli.main(["--procedure", "revision", "--input", str(captions), "--out", str(revised)]) == 0
    )
    records, problems = read_records(revised)
    assert problems == [] and records and {r["source"] for r in records} == {"revision"}
    source_ids = {json.loads(line)["id"] for line in captions.read_text().splitlines()}
    assert {r["meta"]["revised_from"] for r in records} <= source_ids
    views = tmp_path / "views"
    scene = make_scene(21, 0)
    render_scene(scene, num_views=2, width=96, height=72).save(views)
    one = tmp_path / "one"
    one.mkdir()
    (one / "synth_0000.npz").write_bytes((scenes / "synth_0000.npz").read_bytes())
    cc = tmp_path / "cc.jsonl"
    assert (
        cli.main(
            [
                "--scenes",
                str(one),
                "--procedure",
                "chatcaptioner",
                "--views",
                str(views),
                "--out",
                str(cc),
            ]
        )
        == 0
    )
    (r,) = read_records(cc)[0]
    assert (
        r["source"] == "chatcaptioner"
        and r["meta"]["views"] == [0, 1]
        and r["meta"]["split"] == "train"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--scenes", "{scenes}", "--out", "{tmp}/r.json"],
            "error: {tmp}/r.json: --out must name a .jsonl file",
        ),
        (
            ["--scenes", "{tmp}/nowhere", "--out", "{tmp}/r.jsonl"],
            "error: {tmp}/nowhere: --scenes is not a folder",
        ),
        (
            ["--scenes", "{tmp}", "--out", "{tmp}/r.jsonl"],
            "error: {tmp}: no scene files (*.npz) found",
        ),
        (
            ["--scenes", "{scenes}", "--tasks", "qa,poems", "--out", "{tmp}/r.jsonl"],
            "error: --tasks: unknown task 'poems'",
        ),
        (
            ["--scenes", "{scenes}", "--val-fraction", "1.5", "--out", "{tmp}/r.jsonl"],
            "error: --val-fraction must be in [0, 1), got 1.5",
        ),
        (
            [
                "--scenes",
                "{scenes}",
                "--backend",
                "openai",
                "--procedure",
                "offline",
                "--out",
                "{tmp}/r.jsonl",
            ],
            "error: --procedure offline uses no LLM",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(scenes, tmp_path, args, message):
    fill = lambda s: s.format(scenes=scenes, tmp=tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline.language", *map(fill, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(fill(message)), proc.stderr
    assert not os.path.exists(tmp_path / "r.jsonl")
