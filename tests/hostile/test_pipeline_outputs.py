"""Issue 22, case 9: an --out that is a file or unwritable, or a full disk, is one line.

No traceback, exit status 1, and no partial output.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from data_pipeline.scenes.synthetic import make_scene
from tests.hostile.pipeline_inputs import assert_no_traceback, run_module, tree

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "convert"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data_pipeline"))
from test_pth import _tensor_pickle, _write_zip  # noqa: E402
from test_tfds_fixtures import write_fixture  # noqa: E402

UNWRITABLE = "/proc/x"  # not creatable, even by root


def one_error_line(proc) -> str:
    assert_no_traceback(proc)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture
def an_existing_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("keep me")
    return path


def released_inputs(root):
    features, voxels = root / "pt", root / "npy"
    features.mkdir()
    voxels.mkdir()
    data = np.random.default_rng(0).normal(size=(4, 8)).astype("<f4")
    _write_zip(features / "s.pt", _tensor_pickle(0, (4, 8), (8, 1), 32), {"0": data.tobytes()})
    np.save(voxels / "s.npy", np.arange(12).reshape(4, 3))
    return ["--features", str(features), "--voxels", str(voxels)]


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_released_out(tmp_path, an_existing_file, where):
    out = str(an_existing_file) if where == "file" else UNWRITABLE
    proc = run_module("data_pipeline.released", *released_inputs(tmp_path), "--out", out)
    line = one_error_line(proc)
    assert line.startswith(f"error: {out}: --out ")
    assert an_existing_file.read_text() == "keep me"


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_tfds_out(tmp_path, an_existing_file, where):
    features_dir, records, _, _ = write_fixture(str(tmp_path), num_scenes=1, records_per_scene=1)
    out = str(an_existing_file) if where == "file" else UNWRITABLE
    proc = run_module(
        "data_pipeline.tfds", "--features", features_dir, "--language", records, "--out", out
    )
    line = one_error_line(proc)
    assert line.startswith(f"error: {out}: --out ")
    assert an_existing_file.read_text() == "keep me"


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_synthetic_out(tmp_path, an_existing_file, where):
    out = str(an_existing_file) if where == "file" else UNWRITABLE
    proc = run_module("data_pipeline.scenes.synthetic", "--num-scenes", "1", "--out", out)
    line = one_error_line(proc)
    assert line.startswith(f"error: {out}: --out ")


@pytest.mark.parametrize("module", ["data_pipeline.render", "data_pipeline.features"])
@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_render_and_features_out(tmp_path, an_existing_file, module, where):
    make_scene(8, 0).save(tmp_path / "scenes")
    out = str(an_existing_file) if where == "file" else UNWRITABLE
    args = ["--scenes", str(tmp_path / "scenes"), "--out", out, "--views", "1"]
    if module == "data_pipeline.features":
        args += ["--method", "direct", "--encoder", "random-vit:16"]
    line = one_error_line(run_module(module, *args))
    assert line.startswith(f"error: {out}: --out ")
    assert an_existing_file.read_text() == "keep me"


@pytest.mark.parametrize("where", ["folder", "unwritable"])
def test_language_out(tmp_path, where):
    make_scene(8, 0).save(tmp_path / "scenes")
    out = str(tmp_path / "scenes") if where == "folder" else UNWRITABLE + "/r.jsonl"
    proc = run_module("data_pipeline.language", "--scenes", str(tmp_path / "scenes"), "--out", out)
    one_error_line(proc)
    assert tree(tmp_path) == {"scenes/synth_0000.npz"}


@pytest.mark.parametrize("tasks", ["all", "caption"])
def test_language_full_disk_leaves_no_partial_output(tmp_path, tasks):
    """`all`: the resume file outgrows the limit; `caption`: only the histogram PNG does,
    after the records and the stats were written, which are then removed."""
    scenes = tmp_path / "scenes"
    for index in range(5 if tasks == "all" else 1):
        make_scene(8, index).save(scenes)
    out = tmp_path / "out" / "r.jsonl"
    args = ["--scenes", str(scenes), "--out", str(out)]
    if tasks != "all":
        args += ["--tasks", tasks]
    # Files may not grow past 8 KiB: a full disk, as far as the writer can tell.
    proc = run_module("data_pipeline.language", *args, shell_setup="ulimit -f 8")
    line = one_error_line(proc)
    assert "cannot write (File too large)" in line
    left = tree(tmp_path / "out")
    assert not left & {"r.jsonl", "r.stats.json", "r.lengths.png"}, left
    assert not [f for f in left if f.endswith(".tmp")], left
    if tasks == "all":
        assert line.startswith(f"error: {out}.partial: ")  # the resume file a rerun goes on from
    else:
        assert line.startswith(f"error: {tmp_path / 'out' / 'r.lengths.png'}: ")


def test_tfds_full_disk_leaves_no_partial_output(tmp_path):
    features_dir, records, _, _ = write_fixture(
        str(tmp_path), num_scenes=4, records_per_scene=2, num_points=2000, dim=64
    )
    out = tmp_path / "out"
    proc = run_module(
        "data_pipeline.tfds", "--features", features_dir, "--language", records, "--out", str(out),
        shell_setup="ulimit -f 100",
    )  # fmt: skip
    line = one_error_line(proc)
    assert line == f"error: {out}: cannot write (File too large)"
    assert tree(out) == set() and os.listdir(out) == []
