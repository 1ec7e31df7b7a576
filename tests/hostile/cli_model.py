"""A tiny exported 3D-LLM and scene files for the hostile-input tests of the CLIs.

Built in-process in a few seconds: a small trained tokenizer with location tokens, a random-init
`LLM3DConfig.tiny` sized to it, written by `llm3d_jax.infer.exported.export` as tools/export.py
writes it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from llm3d_jax import tokens
from llm3d_jax.fileio import save_npz_atomic
from llm3d_jax.infer import exported
from llm3d_jax.model import llm3d

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_POINTS = 24
PROMPT_LEN = 40
ANSWER_LEN = 8
FEATURE_DIM = 16


def make_model(out_dir: str, params_format: str = "orbax") -> str:
    texts = ["where is the brown chair", "a white table near the wall", "what colour is it"] * 4
    tok_dir = out_dir + ".tok"
    tokenizer = tokens.train_tokenizer(texts, 200, tok_dir)
    vocab = len(tokenizer)
    offset = tokens.add_location_tokens(tokenizer, 16)
    config = llm3d.with_overrides(
        llm3d.LLM3DConfig.tiny(),
        feature_dim=FEATURE_DIM,
        vocab_size=vocab,
        loc_offset=offset,
        loc_bins=16,
        num_points=NUM_POINTS,
    )
    module = llm3d.LLM3D(config)
    params = llm3d.init_params(module, seed=0)
    inference = {
        "num_points": NUM_POINTS,
        "prompt_len": PROMPT_LEN,
        "answer_len": ANSWER_LEN,
        "eos_id": 1,
        "pad_id": 0,
        "prompt_templates": {"grounding": "Locate: {prompt}"},
    }
    exported.export(
        out_dir,
        module,
        params,
        tokenizer=tokenizer,
        inference=inference,
        params_format=params_format,
    )
    return out_dir


def make_scene(path: str, dim: int = FEATURE_DIM, n: int = 40, seed: int = 1, **replace) -> str:
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 4, (n, 3)).astype(np.float32)
    arrays = dict(
        points=points,
        features=rng.normal(size=(n, dim)).astype(np.float16),
        voxels=np.floor(points / (4 / 256)).clip(0, 255).astype(np.uint8),
        grid_origin=np.zeros(3, np.float32),
        grid_voxel=np.float32(4 / 256),
        object_ids=np.array([3], np.int32),
        object_labels=np.array(["chair"]),
        object_boxes=np.array([[1, 1, 0, 2, 2, 1]], np.float32),
    )
    arrays.update(replace)
    save_npz_atomic(path, **arrays)
    return str(path)


def run_cli(args: list[str], cwd: str | None = None, timeout: int = 300):
    """Runs a CLI as users do (a fresh process) -> CompletedProcess with text stdout/stderr."""
    # The test process's XLA_FLAGS too: a random init must give the same bits as in-process.
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
