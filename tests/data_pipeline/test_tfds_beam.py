"""`python -m data_pipeline.tfds.beam` on the DirectRunner with 2 worker processes builds what
`data_pipeline.features` + `data_pipeline.tfds` build, record by record and field by field, from
the demo's synthetic rooms (seed 0, the demo's feature settings at a small render size); a room
whose features fail is skipped and reported, the rest built."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from data_pipeline import features
from data_pipeline.language import __main__ as language
from data_pipeline.render import render_scene
from data_pipeline.scenes.synthetic import make_scene
from data_pipeline.tfds import beam as beam_build
from data_pipeline.tfds import build
from llm3d_jax.data.sources import dataset_metadata
from llm3d_jax.fileio import cli_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# make demo's feature stage (tools/demo.py), on 2 small renders per room.
SETTINGS = ["--method", "fusion", "--encoder", f"vit:{REPO}/assets/demo/encoder"]
SETTINGS += ["--masked-crops", "--max-points", "256", "--balance"]
SETTINGS += ["--views", "2", "--width", "48", "--height", "36"]
TWO_WORKERS = "--beam_pipeline_options=direct_num_workers=2,direct_running_mode=multi_processing"


def demo_rooms(root) -> tuple[str, str]:
    """4 rooms of seed 0 and their offline language records (synth_0001 in validation); the
    views of synth_0003 have a NaN depth, so its features fail."""
    scenes = str(root / "scenes")
    for index in range(4):
        make_scene(0, index).save(scenes)
    bad = render_scene(make_scene(0, 3), 2, 48, 36)
    depth = bad.depth.copy()
    depth[0, 3, 4] = np.nan
    dataclasses.replace(bad, depth=depth).save(os.path.join(scenes, "views"))
    records = str(root / "records.jsonl")
    assert language.main(["--scenes", scenes, "--out", records, "--val-fraction", "0.34"]) == 0
    return scenes, records


def read_dataset(out: str, name: str, split: str) -> list[dict]:
    source = tfds.data_source(f"{name}/synthetic", data_dir=out, split=split)
    return [source[i] for i in range(len(source))]


def assert_same_fields(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for key in want:
        a, b = np.asarray(got[key]), np.asarray(want[key])
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where} {key}"
        np.testing.assert_array_equal(a, b, err_msg=f"{where} {key}")


def test_beam_build_on_two_workers_equals_the_single_process_build(tmp_path, capfd):
    scenes, records = demo_rooms(tmp_path)
    single_features, single_out = str(tmp_path / "features1"), str(tmp_path / "tfds1")
    assert features.main(["--scenes", scenes, "--out", single_features, *SETTINGS]) == 1
    single = build(single_features, records, single_out)

    # One room's feature file is already there (made with the same settings): the Beam build
    # keeps it; the others are made on the workers.
    beam_features, beam_out = tmp_path / "features2", str(tmp_path / "tfds2")
    beam_features.mkdir()
    shutil.copy(os.path.join(single_features, "synth_0000.npz"), beam_features)
    kept = os.stat(beam_features / "synth_0000.npz").st_mtime_ns
    argv = ["--scenes", scenes, "--features", str(beam_features), "--language", records]
    assert beam_build.main([*argv, "--out", beam_out, *SETTINGS, TWO_WORKERS]) == 1
    out, err = capfd.readouterr()  # fd level: the workers' lines too
    with open(os.path.join(beam_out, "build_report.synthetic.json")) as f:
        report = json.load(f)

    # The bad room: skipped, reported (file and reason), its records rejected; the rest built.
    views = os.path.join(scenes, "views", "synth_0003.npz")
    (rejected,) = report["rejected_scenes"]
    assert rejected["scene_id"] == "synth_0003" and rejected["file"] == views
    assert "NaN" in rejected["reason"] and f"warning: {views}: {rejected['reason']}" in err
    assert report["counts"]["features"] == {"made": 2, "kept": 1, "failed": 1}
    assert "features: 2 made, 1 already done, 1 failed" in out
    made_by = [line.rsplit("(pid ", 1)[1] for line in err.splitlines() if " points, " in line]
    assert len(made_by) == 2 and str(os.getpid()) + ")" not in made_by  # on worker processes
    assert sorted(os.listdir(beam_features)) == [f"synth_000{i}.npz" for i in range(3)]
    assert os.stat(beam_features / "synth_0000.npz").st_mtime_ns == kept
    bad_records = {r["id"] for r in report["rejected_records"]}
    assert bad_records == {r["id"] for r in single["rejected_records"]}
    assert all(r["reason"].startswith("scene rejected: ") for r in report["rejected_records"])
    for key in ("scenes", "records", "dim"):
        assert report["counts"][key] == single["counts"][key], key
    assert report["counts"]["scenes"] == {"train": 2, "validation": 1}  # both splits covered

    # Record by record, field by field, keyed by record id (never by position).
    assert dataset_metadata(beam_out, "synthetic") == dataset_metadata(single_out, "synthetic")
    for split in ("train", "validation"):
        scenes_of = {}
        for out_dir in (single_out, beam_out):
            rows = read_dataset(out_dir, "llm3d_scenes", split)
            scenes_of[out_dir] = [r["scene_id"] for r in rows]
            by_id = {r["scene_id"]: r for r in rows}
            if out_dir == single_out:
                want_scenes = by_id
            else:
                assert by_id.keys() == want_scenes.keys()
                for scene_id, row in by_id.items():
                    assert_same_fields(row, want_scenes[scene_id], f"{split} {scene_id}")
        for out_dir in (single_out, beam_out):
            rows = read_dataset(out_dir, "llm3d_language", split)
            # the join: scene_index names the same scene in each build's own scenes split
            by_id = {
                r["id"]: {**r, "scene_index": scenes_of[out_dir][r["scene_index"]]} for r in rows
            }
            if out_dir == single_out:
                want_records = by_id
            else:
                assert by_id.keys() == want_records.keys() and len(rows) == len(by_id)
                for record_id, row in by_id.items():
                    assert_same_fields(row, want_records[record_id], f"{split} {record_id}")
        assert len(want_records) == report["counts"]["records"][split]
        assert all(r["scene_index"] == r["scene_id"] for r in want_records.values())
    # The workers write the scene shards uncompressed, as the single-process build does.
    scene_dir = os.path.join(beam_out, "llm3d_scenes", "synthetic", "1.0.0")
    shards = [n for n in os.listdir(scene_dir) if ".array_record-" in n]
    assert len(shards) == 2
    for name in shards:
        reader = array_record_module.ArrayRecordReader(os.path.join(scene_dir, name))
        assert "uncompressed" in reader.writer_options_string().split(",")
        reader.close()
    assert not [n for n in os.listdir(beam_out) if n.startswith(".beam-")]  # its work folder


def test_bad_options_are_one_line_before_any_work(tmp_path, capsys):
    scenes = tmp_path / "scenes"
    make_scene(0, 0).save(scenes)
    records = tmp_path / "records.jsonl"
    records.write_text("")
    argv = ["--scenes", str(scenes), "--features", str(tmp_path / "f"), "--language"]
    argv += [str(records), "--out", str(tmp_path / "out"), *SETTINGS]
    for extra, message in (
        (["--beam_pipeline_options=direct_num_worker=2"], "unknown Beam option(s)"),
        (["--encoder", "resnet"], "expected random-vit[:D], vit:DIR, blip2:DIR or clip:DIR"),
        ([], "no valid records"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(lambda extra=extra: beam_build.main([*argv, *extra]))
        assert exit_info.value.code == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not os.path.exists(tmp_path / "out" / "llm3d_scenes")
