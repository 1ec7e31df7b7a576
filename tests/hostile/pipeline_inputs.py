"""Hostile inputs for the data-pipeline battery (tests/hostile/test_pipeline_*.py).

Each helper writes one careless or malicious file by hand, bypassing the project's own
writers (which refuse to write them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_module(
    module: str, *args: str, timeout: float = 120, **kwargs
) -> subprocess.CompletedProcess:
    """`python -m module args` with this checkout first on the path; text output captured."""
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", **kwargs.pop("env", {})}
    # A shell set-up line (e.g. `ulimit -f 8`) runs in bash before python replaces it; no
    # preexec_fn, which would fork a process that has JAX's threads.
    setup = kwargs.pop("shell_setup", None)
    prefix = ["bash", "-c", f'{setup} && exec "$0" "$@"'] if setup else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", module, *args],
        cwd=kwargs.pop("cwd", REPO),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        **kwargs,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def rewrite_npz(path, **changes) -> None:
    """Replaces arrays of an existing .npz in place (no validation, no atomic write)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def set_scene_id(path, scene_id: str) -> None:
    """Sets meta.scene_id of a scene (or feature) file to any string."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
    meta["scene_id"] = scene_id
    rewrite_npz(path, meta=np.array(json.dumps(meta)))


def tree(root) -> set[str]:
    """Every file under `root`, relative to it."""
    return {
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    }
