"""experiments/train.py end to end on the tiny model and synthetic data: outputs, loss going
down, kill -9 / SIGTERM and resume, two processes over CPU collectives (SIGTERM to one stops
both at the same step), bad configs."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from llm3d_jax.fileio import InputError
from llm3d_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "experiments", "train.py")
STEPS = 10
FLAGS = [
    "--config",
    os.path.join(REPO, "experiments", "configs", "demo.py"),
    "--config.data_source=synthetic",
    f"--config.total_steps={STEPS}",
    "--config.batch_size=8",
    "--config.seed=3",
    "--config.checkpoint_every=2",
    "--config.log_every=1",
    "--config.eval_every=4",
    "--config.eval_steps=1",
    "--config.model.preset=tiny",
    "--config.data.num_points=32",
    "--config.data.prompt_len=8",
    "--config.data.answer_len=6",
    "--config.optim.lr=3e-3",
    "--config.optim.warmup_steps=2",
]


CACHE = None  # a persistent compilation cache shared by this module's runs (set by `reference`)


def _env(devices=2, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # Cheap CPU compiles (a third of the default's time); every run here uses the same flags.
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    if CACHE:
        env.update(
            JAX_COMPILATION_CACHE_DIR=CACHE,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    env.update(extra)
    return env


def _train(workdir, *extra, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, TRAIN, *FLAGS, f"--workdir={workdir}", *extra],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _start(workdir, *extra):
    return subprocess.Popen(
        [sys.executable, TRAIN, *FLAGS, f"--workdir={workdir}", "--config.eval_every=0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _wait_for_rows(proc, path, rows, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if os.path.exists(path) and len(read_jsonl(path)) >= rows:
            return
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    raise AssertionError("timed out waiting for metrics")


def _losses(workdir):
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    global CACHE
    CACHE = str(tmp_path_factory.mktemp("jax_cache"))
    workdir = tmp_path_factory.mktemp("reference")
    proc = _train(workdir)
    return workdir, proc


def test_outputs_and_loss_decreases(reference):
    workdir, proc = reference
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    assert (workdir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(workdir / "tensorboard")
    assert max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == STEPS
    assert "memory per device" in proc.stdout
    # Rerunning a finished run resumes at the end and trains nothing more.
    again = _train(workdir)
    assert "already trained" in again.stdout
    assert _losses(workdir) == {r["step"]: r["loss"] for r in rows}


def test_kill9_then_sigterm_then_resume_reproduces_the_uninterrupted_run(reference, tmp_path):
    expected = _losses(reference[0])
    metrics_path = str(tmp_path / "metrics.jsonl")
    kill_at = random.randint(2, 4)  # logged rows trail the running step by one
    print(f"kill -9 after logged step {kill_at}")
    proc = _start(tmp_path)
    _wait_for_rows(proc, metrics_path, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # Resume, and get preempted right away: one step, a checkpoint of it, status 143.
    proc = _start(tmp_path)
    for line in proc.stdout:
        if line.startswith("state: "):
            # The killed run's newest checkpoint may still have been in flight: then none.
            restored = int(line.split("resumed from step ")[1]) if "resumed" in line else 0
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert f"SIGTERM: saved a checkpoint at step {restored + 1}; exiting" in out
    assert str(restored + 1) in os.listdir(tmp_path / "checkpoints")

    resumed = _train(tmp_path, "--config.eval_every=0")
    assert f"resumed from step {restored + 1}" in resumed.stdout
    got = _losses(tmp_path)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose(
        [got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-6
    )


def _start_two(workdir):
    """Two processes of train.py (one CPU device each) over a local coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        subprocess.Popen(
            [sys.executable, TRAIN, *FLAGS, f"--workdir={workdir}", "--config.eval_every=0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(
                devices=1,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
        )
        for i in range(2)
    ]


def test_two_processes_stop_together_on_sigterm_to_one_and_match_one_process(reference, tmp_path):
    """SIGTERM to process 1 only, once both train: both save the same step and exit 143; the
    rerun resumes there and its losses are the uninterrupted one-process run's."""
    procs = _start_two(tmp_path)
    _wait_for_rows(procs[0], str(tmp_path / "metrics.jsonl"), 1)  # step 1 done on both
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 143, err[-3000:]
    out = outputs[0][0]
    assert "2 process(es)" in out
    assert "config:" not in outputs[1][0] and "step" not in outputs[1][0]  # only process 0 logs
    stopped = int(out.split("SIGTERM: saved a checkpoint at step ")[1].split(";")[0])
    assert 1 < stopped < STEPS
    saved = tmp_path / "checkpoints"
    assert max(int(d) for d in os.listdir(saved) if d.isdigit()) == stopped
    for i in range(2):  # each process writes its own data-iterator state into the step it saves
        data = json.loads((saved / str(stopped) / "data" / f"process_{i}-of-2.json").read_text())
        assert data["index"] == stopped, (i, data)

    procs = _start_two(tmp_path)
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert f"resumed from step {stopped}" in outputs[0][0]
    expected = _losses(reference[0])
    got = _losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-6
    )


def test_bad_mesh_is_a_one_line_error_before_compiling(tmp_path):
    proc = _train(tmp_path, "--config.mesh=(3,1,1)", check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "needs 3 devices but 2 are present" in lines[-1]
    assert "Traceback" not in proc.stderr and "compiled" not in proc.stdout


def _config(**overrides):
    sys.path.insert(0, REPO)
    from experiments.configs import demo

    config = demo.get_config()
    config.data_source = "synthetic"
    config.update_from_flattened_dict(overrides)
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 6}, "not divisible by the 8 data-parallel devices"),
        ({"trainable": (r"qformer/.*", r"no_such_param/.*")}, "matches no parameter"),
        ({"model.pretrained": "/no/such/blip2"}, "pretrained model directory not found"),
        ({"data.scene_cache": "gpu"}, "config.data.scene_cache must be one of"),
        ({"data.worker_count": -1}, "config.data.worker_count must be >= 0"),
        ({"data.scene_cache_budget_gb": 0.0}, "config.data.scene_cache_budget_gb must be > 0"),
    ],
)
def test_bad_config_values_fail_before_compiling(tmp_path, overrides, message, capsys):
    from experiments import train

    with pytest.raises(InputError, match=message):
        train.train(_config(**overrides), str(tmp_path))
    assert "compiled" not in capsys.readouterr().out


def test_trains_on_tfds_data_through_the_grain_pipeline(tmp_path):
    """The real data path: TFDS written by data_pipeline.tfds, a trained tokenizer, grain."""
    sys.path.insert(0, os.path.join(REPO, "tests", "data_pipeline"))
    from test_tfds_fixtures import write_fixture

    from data_pipeline.tfds import build
    from llm3d_jax import tokens

    features_dir, records, _, rows = write_fixture(str(tmp_path), num_scenes=6, records_per_scene=4)
    build(features_dir, records, str(tmp_path / "tfds"), "synthetic", val_fraction=0.34, seed=0)
    texts = [r["prompt"] + " " + " ".join(r["answers"]) for r in rows]
    tokens.train_tokenizer(texts, vocab_size=400, out_dir=str(tmp_path / "tok"))
    workdir = tmp_path / "run"
    _train(
        workdir,
        "--config.data_source=tfds",
        f"--config.data_dir={tmp_path / 'tfds'}",
        f"--config.tokenizer={tmp_path / 'tok'}",
        "--config.total_steps=12",
        "--config.eval_every=6",
        "--config.batch_size=4",
        "--config.eval_batch_size=4",
        "--config.data.prompt_len=16",
        "--config.data.answer_len=12",
    )
    rows = read_jsonl(str(workdir / "metrics.jsonl"))
    losses = [r["loss"] for r in rows]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    assert os.listdir(workdir / "checkpoints" / "12" / "data")  # the grain iterator state


def test_generation_metrics_and_a_scanned_t5_from_the_command_line(tmp_path):
    """`--config.eval_generate_batches` (greedy answers scored on tokens: synthetic data has no
    text) and `--config.model.scan_layers` on the T5, keys a config file may add to demo.py's."""
    config = tmp_path / "config.py"
    config.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('demo', {FLAGS[1]!r})\n"
        "demo = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(demo)\n\n\n"
        "def get_config():\n"
        "    c = demo.get_config()\n"
        "    c.eval_generate_batches = 0\n"
        "    c.model.scan_layers = False\n"
        "    return c\n"
    )
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            TRAIN,
            "--config",
            str(config),
            *FLAGS[2:],
            f"--workdir={workdir}",
            "--config.total_steps=4",
            "--config.eval_every=2",
            "--config.eval_generate_batches=1",
            "--config.model.scan_layers=True",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_em" in r] == [2, 4]
    assert all(0.0 <= r["val_em"] <= 1.0 and "val_loss" in r for r in rows if "val_em" in r)
    assert "val_acc25" not in rows[-1]  # synthetic batches hold no grounding rows
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["scan_layers"] and saved["eval_generate_batches"] == 1
