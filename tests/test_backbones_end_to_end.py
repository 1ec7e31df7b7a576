"""Every LLM backbone from the command line, with relative paths: a tokenizer
(`python -m llm3d_jax.tokens`), then experiments/train.py on TFDS data and on synthetic batches
-> experiments/eval.py -> tools/export.py -> tools/ask.py, for tiny random T5, OPT, Llama, Qwen2
and Mistral 3D-LLMs (2 steps each: this checks the plumbing, not learning; `FULL` says which
families also run the synthetic smoke command and eval.py)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "data_pipeline"))
from test_tfds_fixtures import write_fixture  # noqa: E402

PRESETS = {
    "t5": "tiny",
    "opt": "tiny_decoder:opt",
    "llama": "tiny_decoder:llama",
    "qwen2": "tiny_decoder:qwen2",
    "mistral": "tiny_decoder:mistral",
}
# The synthetic-data smoke run and experiments/eval.py take the same path for every decoder
# family (the model is built and decoded as in train.py and ask.py): one encoder-decoder and one
# decoder run them; every family trains on TFDS data, exports and answers.
FULL = ("t5", "llama")
SHAPES = [
    "--config.batch_size=4",
    "--config.eval_batch_size=4",
    "--config.data.num_points=32",
    "--config.data.prompt_len=40",
    "--config.data.answer_len=12",
    "--config.eval_every=0",
    "--config.log_every=1",
]

pytestmark = pytest.mark.slow


def _env(cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the scripts make the repository importable themselves
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _run(cwd, env, *args):
    """One command in `cwd`, every path relative to it; -> stdout (stderr shown on failure)."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """tmp/: features/, records.jsonl, tfds/ and tok/ (the tokenizer, made from the command line)."""
    root = tmp_path_factory.mktemp("e2e")
    from data_pipeline.tfds import build

    features_dir, records, _, _ = write_fixture(str(root), num_scenes=6, records_per_scene=4)
    build(features_dir, records, str(root / "tfds"), "synthetic", val_fraction=0.34, seed=0)
    env = _env(root / "jax_cache")
    env["PYTHONPATH"] = REPO  # python -m needs the repository on the path
    out = _run(root, env, "-m", "llm3d_jax.tokens", "--records", "records.jsonl", "--out", "tok",
               "--vocab-size", "400")  # fmt: skip
    assert "+ 256 location tokens" in out
    return root


def _rel(*parts):
    return os.path.join(REPO, *parts)


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_train_eval_export_ask_from_the_command_line(workspace, family):
    cwd, env = workspace, _env(workspace / "jax_cache")
    rel = lambda *p: os.path.relpath(_rel(*p), cwd)
    config = ["--config", rel("experiments", "configs", "demo.py")]
    preset = f"--config.model.preset={PRESETS[family]}"
    run, model = f"run_{family}", f"model_{family}"

    if family in FULL:
        # Synthetic batches: the documented smoke command, no files at all.
        _run(cwd, env, rel("experiments", "train.py"), *config, f"--workdir=syn_{family}", preset,
             "--config.data_source=synthetic", "--config.total_steps=2", *SHAPES)  # fmt: skip
        rows = [json.loads(line) for line in open(cwd / f"syn_{family}" / "metrics.jsonl")]
        assert [r["step"] for r in rows] == [1, 2] and all(r["mfu"] > 0 for r in rows)

    # TFDS data and the command-line tokenizer.
    _run(cwd, env, rel("experiments", "train.py"), *config, f"--workdir={run}", preset,
         "--config.data_dir=tfds", "--config.tokenizer=tok", "--config.total_steps=2",
         *SHAPES)  # fmt: skip
    assert os.path.isdir(cwd / run / "checkpoints" / "2")
    rows = [json.loads(line) for line in open(cwd / run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["mfu"] > 0 for r in rows)

    if family in FULL:
        out = _run(cwd, env, rel("experiments", "eval.py"), "--workdir", run, "--limit", "4",
                   "--batch_size", "2", "--max_new_tokens", "4")  # fmt: skip
        assert "model: step 2" in out
        predictions = [json.loads(line) for line in open(cwd / run / "eval" / "predictions.jsonl")]
        assert len(predictions) == 4 and all("prediction" in p for p in predictions)

    _run(cwd, env, rel("tools", "export.py"), "--workdir", run, "--out", model)
    with open(cwd / model / "llm3d_config.json") as f:
        exported = json.load(f)
    llm = exported["model"]["llm"]
    assert ("family" not in llm) == (family == "t5")
    assert exported["source"]["step"] == 2

    # Random weights answer anything (even nothing): the command must load, encode and decode.
    _run(cwd, env, rel("tools", "ask.py"), "--model", model, "--scene",
         os.path.join("features", "scene0000_00.npz"), "What is it?")  # fmt: skip
