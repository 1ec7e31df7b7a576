"""experiments/train.py on careless settings (issue 22 case 10), a corrupt latest checkpoint
(case 11: one line, not thousands of asyncio/tensorstore lines) and a relative --workdir."""

import os
import shutil
import sys

import pytest

from llm3d_jax.fileio import InputError
from tests.hostile.cli_model import REPO, run_cli

CONFIG = os.path.join(REPO, "experiments", "configs", "demo.py")
FLAGS = [
    "--config",
    CONFIG,
    "--config.data_source=synthetic",
    "--config.batch_size=8",
    "--config.checkpoint_every=1",
    "--config.log_every=1",
    "--config.eval_every=0",
    "--config.model.preset=tiny",
    "--config.data.num_points=16",
    "--config.data.prompt_len=8",
    "--config.data.answer_len=4",
]


def _config(**overrides):
    sys.path.insert(0, REPO)
    from experiments.configs import demo

    config = demo.get_config()
    config.data_source = "synthetic"
    config.model.preset = "tiny"
    config.update_from_flattened_dict(overrides)
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, "config.batch_size must be >= 1, got 0"),
        ({"total_steps": -1}, "config.total_steps must be >= 1, got -1"),
        ({"total_steps": 0}, "config.total_steps must be >= 1, got 0"),
        ({"optim.lr": -1.0}, r"config.optim.lr must be > 0, got -1.0"),
        ({"optim.lr": 0.0}, r"config.optim.lr must be > 0, got 0.0"),
        ({"optim.lr": float("nan")}, r"config.optim.lr must be > 0, got nan"),
        ({"optim.warmup_steps": -5}, "config.optim.warmup_steps must be >= 0"),
        ({"optim.b2": 1.5}, r"config.optim.b2 must be in \[0, 1\)"),
        ({"model.dropout": 1.0}, r"config.model.dropout must be in \[0, 1\)"),
        ({"role_teacher": 1.5}, r"config.role_teacher must be in \[0, 1\], got 1.5"),
        ({"optim.grad_clip": -1.0}, "config.optim.grad_clip must be >= 0"),  # 0: none
        ({"optim.weight_decay": -0.1}, "config.optim.weight_decay must be >= 0"),
        ({"eval_batch_size": 0}, "config.eval_batch_size must be >= 1"),
        ({"microbatches": 0}, "config.microbatches must be >= 1"),
        ({"log_every": 0}, "config.log_every must be >= 1"),
        ({"keep_checkpoints": 0}, "config.keep_checkpoints must be >= 1"),
        ({"checkpoint_every": -2}, "config.checkpoint_every must be >= 0"),
        ({"data.num_points": -3}, "config.data.num_points must be >= 1"),
        ({"data.answer_len": 0}, "config.data.answer_len must be >= 1"),
    ],
)
def test_non_positive_settings_fail_before_anything_is_built(tmp_path, overrides, message, capsys):
    from experiments import train

    with pytest.raises(InputError, match=message) as err:
        train.train(_config(**overrides), str(tmp_path / "run"))
    assert err.value.path is None  # train.py's main names the config file
    assert "mesh:" not in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "run")


def test_negative_learning_rate_is_one_line_from_the_command_line(tmp_path):
    proc = run_cli(
        ["experiments/train.py", *FLAGS, "--workdir", str(tmp_path), "--config.optim.lr=-1.0"]
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {CONFIG}: config.optim.lr must be > 0, got -1.0"
    ]
    assert os.listdir(tmp_path) == []


def _noise(stderr: str) -> list[str]:
    """stderr lines other than tqdm's progress bar."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("train:")]


def _resume_after_a_corrupt_latest_checkpoint(tmp_path):
    """Trains 2 steps in `run` (a relative --workdir), destroys step 2's arrays, resumes to 3:
    -> (stdout, stderr lines that are not progress bars) of the resume."""
    proc = run_cli(
        [
            os.path.join(REPO, "experiments", "train.py"),
            *FLAGS,
            "--workdir",
            "run",
            "--config.total_steps=2",
        ],
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _noise(proc.stderr) == []
    steps = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(steps)) == ["1", "2"]
    # Step 2's array data destroyed: the resume falls back to step 1 and says so in one line.
    state = steps / "2" / "state"
    for sub in os.listdir(state):
        path = state / sub
        if path.is_dir():
            shutil.rmtree(path)
    proc = run_cli(
        [
            os.path.join(REPO, "experiments", "train.py"),
            *FLAGS,
            "--workdir",
            "run",
            "--config.total_steps=3",
        ],
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "state: resumed from step 1" in proc.stdout
    return proc.stdout, _noise(proc.stderr)


def test_relative_workdir_and_a_corrupt_latest_checkpoint_is_one_warning_and_nothing_else(
    tmp_path,
):
    """One warning line, and not one 'Event loop is closed' traceback of the step 2 reads still
    in flight when its restore failed (checkpoint.settled_event_loops lets them finish before
    orbax's loop closes), on a loaded machine too."""
    _, noise = _resume_after_a_corrupt_latest_checkpoint(tmp_path)
    assert len(noise) == 1, "\n".join(noise[:40])
    assert noise[0].startswith("warning: checkpoint step 2 ") and "skipped" in noise[0]
