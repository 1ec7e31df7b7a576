"""Restore a training checkpoint, export it, reload it (bit-identical fp32), ask it; bad input.

The run is written in-process the way experiments/train.py writes it (config, orbax state with the
trainable params, data-iterator state, meta with the frozen-weights fingerprint), so no training
is needed.
"""

import importlib.util
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data_pipeline.tfds import build
from llm3d_jax import loading, tokens
from llm3d_jax.evaluate.grounding import answer_iou
from llm3d_jax.fileio import InputError, save_npz_atomic
from llm3d_jax.infer.restore import load_run, random_init
from llm3d_jax.model import llm3d
from llm3d_jax.train import checkpoint, optimizer
from llm3d_jax.train.step import TrainState
from tools import ask, export, visualize

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data_pipeline"))
from test_tfds_fixtures import write_fixture  # noqa: E402

STEP = 7
NUM_POINTS = 24
PROMPT_LEN = 40


class _Iterator:
    def get_state(self):
        return {"index": 3}

    def set_state(self, state):
        pass


def _config(tok_dir, data_dir):
    spec = importlib.util.spec_from_file_location("demo", "experiments/configs/demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config()
    config.tokenizer = tok_dir
    config.data_dir = data_dir
    config.model.preset = "tiny"  # the unit-test shapes, not the demo's
    config.data.num_points = NUM_POINTS
    config.data.prompt_len = PROMPT_LEN
    # The released 3D-LLM's split (frozen LLM), so the frozen part is regenerated and checked.
    config.trainable = llm3d.TRAINABLE
    config.data.answer_len = 6
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    # A small TFDS folder (the data pipeline's own test fixture) for eval.py, 64-d features.
    features_dir, records, _, rows = write_fixture(
        str(root), num_scenes=4, records_per_scene=3, dim=64
    )
    build(features_dir, records, str(root / "tfds"), "synthetic", val_fraction=0.5, seed=0)
    texts = [r["prompt"] + " " + " ".join(r["answers"]) for r in rows]
    texts += ["where is the brown chair", "a white table near the wall"] * 4
    tok_dir = str(root / "tok")
    tokens.train_tokenizer(texts, 300, tok_dir)
    config = _config(tok_dir, str(root / "tfds"))
    from llm3d_jax.train.setup import build_model

    module, _ = build_model(config)
    params = random_init(module, config.seed)
    trainable, frozen = optimizer.split_trainable(params, tuple(config.trainable))
    assert jax.tree.leaves(frozen)
    # "Trained": every trainable leaf moved, so a restore that fell back to init would show.
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)
    state = TrainState(
        step=jnp.int32(STEP), params=trainable, opt_state=optax.adam(1e-3).init(trainable)
    )
    meta = {
        "frozen": {
            "kind": "random_init",
            "seed": config.seed,
            "model": config.model.to_dict(),
            "fingerprint": checkpoint.fingerprint(frozen),
        },
        "config": json.loads(config.to_json_best_effort()),
    }
    workdir = root / "run"
    manager = checkpoint.make_manager(str(workdir / "checkpoints"), keep=2, save_every=1)
    checkpoint.save(manager, STEP, state, _Iterator(), meta, force=True)
    manager.wait_until_finished()
    manager.close()
    expected = optimizer.merge(trainable, frozen)
    return dict(root=root, workdir=str(workdir), module=module, params=expected, config=config)


def test_a_release_profile_run_restores_with_the_release_trainable_set(tmp_path):
    """load_run splits the params as the run trained them: under the release profile the T5
    embedding table and LM head come from the checkpoint, not from the regenerated init."""
    from llm3d_jax.train import setup

    config = _config("", "")
    config.data_source = "synthetic"
    config.profile = "release"
    config.trainable = ()
    module, _ = setup.build_model(config)
    patterns = setup.trainable_patterns(config)
    assert patterns == llm3d.RELEASE_TRAINABLE
    params = random_init(module, config.seed)
    trainable, frozen = optimizer.split_trainable(params, patterns)
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # "trained"
    state = TrainState(step=jnp.int32(STEP), params=trainable, opt_state=())
    meta = {
        "frozen": {
            "kind": "random_init",
            "seed": config.seed,
            "model": config.model.to_dict(),
            "fingerprint": checkpoint.fingerprint(frozen),
        },
        "config": json.loads(config.to_json_best_effort()),
    }
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), keep=1, save_every=1)
    checkpoint.save(manager, STEP, state, _Iterator(), meta, force=True)
    manager.wait_until_finished()
    manager.close()
    restored = load_run(str(tmp_path))
    np.testing.assert_array_equal(restored.params["llm"]["shared"], trainable["llm"]["shared"])


def _inputs(module, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        features=rng.normal(size=(2, NUM_POINTS, module.config.feature_dim)).astype(np.float32),
        voxels=rng.integers(0, 256, (2, NUM_POINTS, 3)).astype(np.int32),
        point_mask=np.ones((2, NUM_POINTS), bool),
        prompt_ids=rng.integers(2, 100, (2, 8)).astype(np.int32),
        prompt_mask=np.ones((2, 8), bool),
        answer_ids=rng.integers(2, 100, (2, 5)).astype(np.int32),
        answer_mask=np.ones((2, 5), bool),
    )


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert jax.tree.all(jax.tree.map(lambda x, y: np.asarray(x).dtype == np.asarray(y).dtype, a, b))


def test_restore_merges_trained_and_regenerated_frozen_params(run):
    restored = load_run(run["workdir"])
    assert restored.step == STEP and restored.module == run["module"]
    _same(restored.params, run["params"])
    # A step folder and the checkpoints folder name the same checkpoint.
    step_dir = os.path.join(run["workdir"], "checkpoints", str(STEP))
    _same(load_run(step_dir).params, run["params"])


@pytest.fixture(scope="module")
def model_dir(run):
    out = str(run["root"] / "model")
    description = export.export_run(run["workdir"], out)
    assert description["source"]["step"] == STEP and description["params_dtype"] == "float32"
    return out


def test_export_reload_is_bit_identical_in_fp32(run, model_dir):
    module, params = loading.load_llm3d(model_dir)  # delegates to exported.load_exported
    assert module == run["module"]
    _same(params, run["params"])
    inputs = _inputs(module)
    apply = jax.jit(module.apply)
    before = apply({"params": run["params"]}, **inputs)
    after = apply({"params": params}, **inputs)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    _, _, tokenizer, _ = loading.load_exported_bundle(model_dir)
    assert tokenizer.convert_tokens_to_ids("<loc0>") == module.config.llm.loc_offset


def test_export_bf16_safetensors(run):
    out = str(run["root"] / "model_bf16")
    export.export_run(run["workdir"], out, bf16=True, safetensors=True)
    assert os.path.exists(os.path.join(out, loading.EXPORTED_SAFETENSORS))
    module, params = loading.load_exported(out)
    assert module.config.llm.dtype == "bfloat16"
    # Exporting again over an earlier export replaces it.
    export.export_run(run["workdir"], out)
    assert loading.load_exported(out)[0].config.llm.dtype == "float32"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}
    _same(params, jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), run["params"]))


def _scene(path, dim, n=40):
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 4, (n, 3)).astype(np.float32)
    save_npz_atomic(
        path,
        points=points,
        features=rng.normal(size=(n, dim)).astype(np.float16),
        voxels=np.floor(points / (4 / 256)).clip(0, 255).astype(np.uint8),
        grid_origin=np.zeros(3, np.float32),
        grid_voxel=np.float32(4 / 256),
        object_ids=np.array([3], np.int32),
        object_labels=np.array(["chair"]),
        object_boxes=np.array([[1, 1, 0, 2, 2, 1]], np.float32),
    )
    return str(path)


def test_ask_answers_and_rejects_bad_input(run, model_dir, capsys):
    out = model_dir
    dim = run["module"].config.feature_dim
    scene = _scene(run["root"] / "scene.npz", dim)
    png = str(run["root"] / "answer.png")
    assert ask.main(["--model", out, "--scene", scene, "where is the chair", "--png", png]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() and os.path.getsize(png) > 10_000
    answer, _ = ask.ask(out, scene, "where is the chair")
    assert len(answer.token_ids) <= 6  # answer_len of the run

    wrong = _scene(run["root"] / "wide.npz", dim + 3)
    with pytest.raises(InputError, match=f"features are {dim + 3}-d, the model expects {dim}-d"):
        ask.ask(out, wrong, "where is the chair")
    with pytest.raises(InputError, match=f"longer than the model's context of {PROMPT_LEN}"):
        ask.ask(out, scene, "where is the brown chair near the white table " * 3)
    with pytest.raises(InputError, match="not an exported model directory"):
        ask.ask(str(run["root"]), scene, "where is the chair")


def test_incomplete_or_missing_checkpoints_are_clear_errors(run):
    broken = run["root"] / "broken"
    shutil.copytree(run["workdir"], broken)
    shutil.rmtree(broken / "checkpoints" / str(STEP) / "state")
    with pytest.raises(InputError, match="incomplete checkpoint: missing state"):
        export.export_run(str(broken), str(run["root"] / "never"))
    assert not os.path.exists(run["root"] / "never")
    with pytest.raises(InputError, match="no complete checkpoint step"):
        load_run(str(run["root"] / "tok"))
    with pytest.raises(InputError, match="checkpoint folder not found"):
        load_run(str(run["root"] / "nowhere"))
    # Damaged array data: the step is listed but cannot be read.
    damaged = run["root"] / "damaged"
    shutil.copytree(run["workdir"], damaged)
    state = damaged / "checkpoints" / str(STEP) / "state"
    for sub in ("d", "ocdbt.process_0"):
        shutil.rmtree(state / sub, ignore_errors=True)
    with pytest.raises(InputError, match="unreadable checkpoint"):
        load_run(str(damaged))


def test_visualize_renders_boxes(run, tmp_path):
    scene = _scene(tmp_path / "scene.npz", 8)
    png = str(tmp_path / "scene.png")
    assert (
        visualize.main(["--scene", scene, "--out", png, "--objects", "3", "--box", "1 1 0 2 2 0.8"])
        == 0
    )
    assert os.path.getsize(png) > 10_000
    with pytest.raises(InputError, match="--box needs 6 numbers"):
        visualize.main(["--scene", scene, "--out", png, "--box", "1 2 3"])


def test_visualize_numbers_several_answers_with_their_iou(tmp_path):
    """boxes.png of make demo: two answers in one room, each box numbered, each IoU in the title."""
    scene = _scene(tmp_path / "scene.npz", 8)
    gt = "<box>1.000 1.000 0.000 2.000 2.000 1.000</box>"
    rows = [
        dict(
            id="right",
            prompt="Where is the table?",
            prediction=gt,
            answers=[gt],
            boxes=[[1, 1, 0, 2, 2, 1]],
            object_ids=[3],
        ),
        dict(
            id="wrong",
            prompt="Find the lamp.",
            prediction="",
            answers=[gt],
            boxes=[[3, 3, 0, 3.5, 3.5, 1]],
            object_ids=[3],
        ),
        dict(id="none", prompt="Find the lamp.", prediction="", answers=[gt], boxes=[]),
        dict(id="text", prompt="What is it?", prediction="a lamp", answers=["a lamp"], boxes=[]),
    ]
    assert [answer_iou(r) for r in rows] == [1.0, 0.0, 0.0, None]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = str(tmp_path / "two.png")
    argv = ["--scene", scene, "--out", png, "--predictions", str(predictions)]
    assert visualize.main(argv + ["--id", "right", "--id", "wrong"]) == 0
    assert os.path.getsize(png) > 10_000
    with pytest.raises(InputError, match="no prediction with id"):
        visualize.main(argv + ["--id", "right", "--id", "missing"])


def test_eval_writes_predictions_metrics_and_table(run):
    from experiments import eval as eval_cli

    assert eval_cli.main(["--workdir", run["workdir"], "--batch_size", "4", "--split", "val"]) == 0
    out = os.path.join(run["workdir"], "eval")
    with open(os.path.join(out, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert {"prompt", "prediction", "answers", "boxes", "points", "task"} <= set(r)
        assert all(len(b) == 6 for b in r["boxes"])
    with open(os.path.join(out, "metrics.json")) as f:
        summary = json.load(f)
    assert summary["step"] == STEP and summary["split"] == "validation"
    tasks = {r["task"] for r in rows}
    for key, scores in summary["metrics"].items():
        assert key.split("/")[1] in tasks and scores["count"] > 0
        names = ("Acc@0.25", "mIoU") if key.endswith("grounding") else ("BLEU-4", "CIDEr", "EM")
        assert all(0 <= scores[n] for n in names)
    with open(os.path.join(out, "metrics.md")) as f:
        table = f.read()
    assert "3D-LLM (BLIP2-flant5)" in table and f"(step {STEP}" in table
    with pytest.raises(InputError, match="--split must be one of"):
        eval_cli.main(["--workdir", run["workdir"], "--split", "test"])


def test_ask_prepares_a_release_profile_question_the_release_way(tmp_path):
    """An export records the run's profile; ask then feeds the bare processed question and the
    first num_points rows with no point mask (llm3d_jax.data.preprocess), ours its template and
    a masked padding."""
    texts = ["what color is the chair? where is it", "Question: Answer:"] * 10
    tokenizer = tokens.train_tokenizer(texts, vocab_size=300, out_dir=tmp_path)
    encoder = ask.TextEncoder.create(tokenizer, 256)
    rng = np.random.default_rng(0)
    scene = {
        "features": rng.standard_normal((12, 4)).astype(np.float16),
        "voxels": rng.integers(0, 256, (12, 3)).astype(np.uint8),
        "grid_origin": np.zeros(3, np.float32),
        "grid_voxel": np.float32(0.02),
    }
    templates = {"qa": "Question: {prompt} Answer:"}
    for profile, text in (
        ("release", "what color is the chair?"),
        ("ours", "Question: What COLOR is the chair? Answer:"),
    ):
        for num_points in (8, 16):
            info = dict(num_points=num_points, prompt_len=24, answer_len=4, profile=profile)
            model = ask.AskModel(
                None,
                None,
                tokenizer,
                encoder,
                {**info, "prompt_templates": templates},
                None,
                1,
                None,
            )
            row = ask.prepare(model, scene, "What COLOR is the chair?", "qa")
            want = encoder.prompt(text, 24)
            np.testing.assert_array_equal(row["prompt_ids"][row["prompt_mask"]], want)
            real = min(num_points, 12)
            assert row["point_mask"].sum() == (num_points if profile == "release" else real)
            if profile == "release":
                np.testing.assert_array_equal(
                    row["features"][:real], scene["features"][:real].astype(np.float32)
                )
