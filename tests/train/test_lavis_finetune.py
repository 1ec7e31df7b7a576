"""Fine-tuning from a released 3D-LLM LAVIS checkpoint (`.pth`) with its AdamW state, against
PyTorch: the tiny fixture tests/goldens/lavis/lavis_tiny.pth (tools/make_lavis_fixture.py: the
weights and torch optimizer state of 3 real AdamW steps, saved as LAVIS's runner saves them).

- the optax moments and count after loading are the .pth's exp_avg / exp_avg_sq / step;
- experiments/train.py fine-tunes it: the first step's loss is the release's forward's loss in
  PyTorch on the same batch (lavis_step.json), and the params after that step are torch
  AdamW's, resumed from the saved state (lavis_step.npz);
- experiments/eval.py evaluates the .pth directly (no training run);
- a .pth without optimizer state starts from zero moments; a malformed one is one line.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from llm3d_jax.convert import lavis
from llm3d_jax.convert.hf import apply_rules
from llm3d_jax.convert.pth import load_pth
from llm3d_jax.fileio import InputError
from llm3d_jax.infer.restore import load_run, read_checkpoint
from llm3d_jax.model import llm3d
from llm3d_jax.train import optimizer, setup, sharding
from llm3d_jax.train import state as state_lib
from llm3d_jax.train.synthetic import SyntheticBatches
from tests.train.lavis_base import LAVIS, LOC_OFFSET, REPO, make_base, step_settings

PTH = os.path.join(LAVIS, "lavis_tiny.pth")
CONFIG = os.path.join(REPO, "experiments", "configs", "scanqa_flant5xl.py")
STEP = step_settings()


def _flags(pth, base, steps=2):
    """scanqa_flant5xl.py (the release's set-up: default trainable table, scanned T5 blocks)
    on the fixture's synthetic batches, fp32, no dropout (as the reference), the torch run's
    constant learning rate and no clipping (LAVIS clips nothing)."""
    return [
        "--config",
        CONFIG,
        f"--config.model.pretrained={pth}",
        f"--config.model.base={base}",
        "--config.model.dtype=float32",
        "--config.model.remat=False",
        "--config.model.dropout=0.0",
        "--config.data_source=synthetic",
        f"--config.seed={STEP['seed']}",
        f"--config.batch_size={STEP['batch_size']}",
        f"--config.data.num_points={STEP['num_points']}",
        f"--config.data.prompt_len={STEP['prompt_len']}",
        f"--config.data.answer_len={STEP['answer_len']}",
        f"--config.optim.lr={STEP['lr']}",
        f"--config.optim.min_lr={STEP['lr']}",
        "--config.optim.warmup_steps=0",
        f"--config.optim.weight_decay={STEP['weight_decay']}",
        "--config.optim.grad_clip=1e9",
        f"--config.total_steps={steps}",
        "--config.checkpoint_every=1",
        "--config.log_every=1",
        "--config.eval_every=0",
    ]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the scripts make the repository importable themselves
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return env


def _run(*args):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=_env(), timeout=600
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(str(tmp_path_factory.mktemp("lavis") / "base"))


def _config(pth, base, trainable=()):
    sys.path.insert(0, REPO)
    from experiments.configs import scanqa_flant5xl

    config = scanqa_flant5xl.get_config()
    config.data_source = "synthetic"
    config.model.update(pretrained=pth, base=base, dtype="float32", remat=False)
    config.update(batch_size=2, trainable=trainable)
    config.data.num_points = 16
    return config


def _loaded_state(config):
    module, params, moments = setup.build_model(config, with_optimizer=True)
    mesh = sharding.make_mesh(config.mesh)
    training = setup.build_training(config, mesh, module)
    with jax.set_mesh(mesh):
        state, _ = state_lib.init_from_params(
            params, training.tx, training.patterns, training.state_sh, training.frozen_sh, moments
        )
    return optimizer.adam_state(jax.device_get(state.opt_state))


def test_the_fixed_batch_is_the_first_synthetic_batch():
    batches = SyntheticBatches(
        **{k: STEP[k] for k in ("batch_size", "num_points", "prompt_len", "answer_len", "seed")},
        feature_dim=24,
        vocab_size=LOC_OFFSET,
        answer_offset=LOC_OFFSET,
        sharding=None,
    )
    with np.load(os.path.join(LAVIS, "lavis_step_batch.npz")) as saved:
        got = batches.host_batch(0)
        assert sorted(saved.files) == sorted(got)
        for key in saved.files:
            np.testing.assert_array_equal(got[key], saved[key], err_msg=key)


def test_optax_moments_after_loading_are_the_pth_state(base, capsys):
    # The release's trainable set plus one param the .pth has no state for (zero moments).
    trainable = (*llm3d.TRAINABLE, r"llm/encoder/final_norm/scale")
    adam = _loaded_state(_config(PTH, base, trainable))
    out = capsys.readouterr().out
    assert "AdamW state at step 3" in out
    assert "the state of 2 tensors frozen here is dropped (llm/lm_head, llm/shared)" in out
    assert "1 trainable tensors without state start from zero moments" in out

    saved = load_pth(PTH)["optimizer"]["state"]
    with open(os.path.join(LAVIS, "lavis_tiny_ids.json")) as f:
        ids = json.load(f)  # the numbers torch gave the parameters (written by the fixture tool)
    assert int(adam.count) == 3 and all(float(e["step"]) == 3 for e in saved.values())
    for ours, theirs in (("mu", "exp_avg"), ("nu", "exp_avg_sq")):
        tree = getattr(adam, ours)
        torch_state = lambda name, key=theirs: saved[ids[name]][key]
        q = tree["qformer"]
        np.testing.assert_array_equal(q["query_tokens"], torch_state("query_tokens"))
        np.testing.assert_array_equal(
            q["layer_2"]["crossattention"]["value"]["kernel"],
            torch_state("Qformer.bert.encoder.layer.2.crossattention.self.value.weight").T,
        )
        np.testing.assert_array_equal(
            q["layer_1"]["mlp"]["norm"]["bias"],
            torch_state("Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias"),
        )
        np.testing.assert_array_equal(
            q["layernorm"]["scale"], torch_state("Qformer.bert.embeddings.LayerNorm.weight")
        )
        np.testing.assert_array_equal(tree["proj"]["kernel"], torch_state("t5_proj.weight").T)
        np.testing.assert_array_equal(tree["proj"]["bias"], torch_state("t5_proj.bias"))
        llm = tree["llm"]
        np.testing.assert_array_equal(
            llm["loc_embed"], torch_state("t5_model.shared.weight")[LOC_OFFSET:]
        )
        np.testing.assert_array_equal(
            llm["loc_head"], torch_state("t5_model.lm_head.weight")[LOC_OFFSET:].T
        )
        assert not np.any(llm["encoder"]["final_norm"]["scale"])  # no state in the .pth
        # every Q-Former tensor has its state (none is left at zero)
        assert all(np.any(v) for v in jax.tree.leaves(q))


def test_a_pth_without_optimizer_state_starts_from_zero_moments(base, capsys):
    config = _config(os.path.join(LAVIS, "lavis_no_optimizer.pth"), base)
    adam = _loaded_state(config)
    assert "no state in the checkpoint" in capsys.readouterr().out
    assert int(adam.count) == 0
    assert not any(np.any(x) for x in jax.tree.leaves((adam.mu, adam.nu)))


def test_a_pth_needs_its_base_directory(base):
    config = _config(PTH, "")
    with pytest.raises(InputError, match="needs config.model.base") as err:
        setup.build_model(config)
    assert err.value.path == PTH


def _expected_after_step(params_like) -> dict:
    """lavis_step.npz (torch's weights after one AdamW step, LAVIS names) in our layout."""
    with np.load(os.path.join(LAVIS, "lavis_step.npz")) as f:
        torch_after = {k: f[k] for k in f.files}
    shared = torch_after.pop("t5_model.shared.weight")
    head = torch_after.pop("t5_model.lm_head.weight")
    target = {k: params_like[k] for k in ("qformer", "proj")}
    out = apply_rules(torch_after, lavis.lavis_rules(), target, allow_missing=[".*"])
    return {**out, "llm": {"loc_embed": shared[LOC_OFFSET:], "loc_head": head[LOC_OFFSET:].T}}


def test_finetunes_through_train_py_as_torch_does(base, tmp_path):
    workdir = tmp_path / "run"
    proc = _run(
        os.path.join(REPO, "experiments", "train.py"), *_flags(PTH, base), f"--workdir={workdir}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AdamW state at step 3" in proc.stdout
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[0]["lr"] == pytest.approx(STEP["lr"])
    diff = abs(rows[0]["loss"] - STEP["loss"])
    print(f"first-step loss {rows[0]['loss']:.7f}, PyTorch {STEP['loss']:.7f}, diff {diff:.2e}")
    assert diff < 1e-4

    # One optax step from the loaded state = one torch AdamW step from the saved state.
    run = load_run(str(workdir))  # what eval.py and export.py restore: the .pth over its base
    assert run.step == 2 and run.tokenizer_path == base
    step, params, meta = read_checkpoint(str(workdir / "checkpoints" / "1"))
    assert step == 1 and meta["frozen"]["base"]["path"] == os.path.abspath(base)
    want = _expected_after_step(params)
    flat_got = traverse_util.flatten_dict(params)
    flat_want = traverse_util.flatten_dict(want)
    assert sorted(flat_got) == sorted(flat_want)
    # Attention key biases are left out: a bias added to every key shifts each query's logits
    # by one constant, which softmax ignores, so their gradient is 0 up to float rounding, and
    # Adam divides that rounding noise by its own size (an lr-sized step in either framework).
    noise_only = lambda key: key[-2:] == ("key", "bias")
    assert sum(map(noise_only, flat_want)) == 5  # 3 self- and 2 cross-attention layers
    for key, value in flat_want.items():
        if not noise_only(key):
            np.testing.assert_allclose(flat_got[key], value, rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_a_malformed_optimizer_state_is_one_line(base, tmp_path):
    bad = os.path.join(LAVIS, "lavis_bad_optimizer.pth")
    proc = _run(
        os.path.join(REPO, "experiments", "train.py"), *_flags(bad, base), f"--workdir={tmp_path}"
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: optimizer: exp_avg of t5_proj.weight has shape (32, 16), the weight (16, 32)"
    ]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_eval_py_evaluates_the_pth_directly(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tests", "data_pipeline"))
    from test_tfds_fixtures import write_fixture

    from data_pipeline.tfds import build

    features, records, _, rows = write_fixture(str(tmp_path), num_scenes=3, dim=24)
    build(features, records, str(tmp_path / "tfds"), "synthetic", val_fraction=0.34, seed=0)
    words = sorted({w for r in rows for w in (r["prompt"] + " " + " ".join(r["answers"])).split()})
    base = make_base(str(tmp_path / "base"), words)
    config = _config(PTH, base).to_dict()
    config["data"].update(
        datasets="synthetic", prompt_len=16, answer_len=8, features_dtype="float32"
    )
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    out = tmp_path / "out"
    proc = _run(os.path.join(REPO, "experiments", "eval.py"), "--pretrained", PTH, "--base", base,
                "--config", str(tmp_path / "config.json"), "--data_dir", str(tmp_path / "tfds"),
                "--out", str(out), "--limit", "4", "--batch_size", "2", "--max_new_tokens", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model: {PTH} as it is" in proc.stdout
    predictions = [json.loads(line) for line in open(out / "eval" / "predictions.jsonl")]
    assert len(predictions) == 4 and all("prediction" in p for p in predictions)
    assert json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
