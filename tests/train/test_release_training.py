"""The `release` training profile: LAVIS's per-epoch schedule (values from
tests/fixtures/release/cases.json, tools/make_release_cases.py), the release's trainable set
(the T5 embedding table and LM head too), exact GELU, no clipping, and its config file."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import optax
import pytest

from llm3d_jax.fileio import InputError
from llm3d_jax.model import llm3d
from llm3d_jax.train import config_checks, optimizer, setup, sharding
from llm3d_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = os.path.join(REPO, "tests", "fixtures", "release", "cases.json")


def _config(name, **overrides):
    path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(overrides)
    return config


def _tiny(name, **overrides):
    """`name`'s config on the tiny T5 3D-LLM, synthetic batches, float32."""
    return _config(
        name,
        **{
            "data_source": "synthetic",
            "model.preset": "tiny",
            "model.dtype": "float32",
            "model.remat": False,
            "model.scan_layers": False,
            "data.num_points": 16,
            "data.prompt_len": 6,
            "data.answer_len": 4,
            "batch_size": 4,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def schedules():
    with open(CASES) as f:
        return json.load(f)["schedules"]


def test_schedule_is_lavis_linear_warmup_cosine_per_epoch(schedules):
    for case in schedules:
        schedule = optimizer.make_release_schedule(**case["params"])
        got = [float(schedule(step)) for step in case["steps"]]
        np.testing.assert_allclose(got, case["lr"], rtol=1e-6, err_msg=str(case["params"]))


def test_release_config_is_the_released_scanqa_run(schedules):
    config = _config("scanqa_3dllm_release")
    config_checks.check_config(config)
    assert config.profile == "release" and config.batch_size == 32
    assert config.optim.grad_clip == 0.0 and config.optim.weight_decay == 0.05
    assert (config.optim.b1, config.optim.b2) == (0.9, 0.999)
    assert config.total_steps == 100 * 799
    # Its schedule is the release's 16-GPU ScanQA schedule of the cases, step for step.
    (case,) = [c for c in schedules if c["params"]["steps_per_epoch"] == 799]
    schedule = setup.build_schedule(config)
    got = [float(schedule(step)) for step in case["steps"]]
    np.testing.assert_allclose(got, case["lr"], rtol=1e-6)
    # The paper's config keeps ours: per-step warm-up from 0 to 1e-5, clipping at 1.
    paper = _config("scanqa_flant5xl")
    assert paper.profile == "ours" and paper.optim.grad_clip == 1.0
    assert float(setup.build_schedule(paper)(0)) == 0.0


def _trainable_paths(config):
    module, params = setup.build_model(config)
    assert params is None
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    training = setup.build_training(config, mesh, module)
    return module, training, set(optimizer.param_paths(training.trainable_abs))


def test_release_trains_the_embedding_table_and_lm_head_with_exact_gelu():
    module, training, paths = _trainable_paths(_tiny("scanqa_3dllm_release"))
    assert module.config.llm.activation == "gelu"  # exact, as LAVIS's Blip2T5 sets it
    assert {"llm/shared", "llm/lm_head", "llm/loc_embed", "llm/loc_head"} <= paths
    assert {p.split("/")[0] for p in paths} == {"qformer", "proj", "llm"}
    assert not any(p.startswith("llm/encoder") or p.startswith("llm/decoder") for p in paths)
    decay = optimizer.weight_decay_mask(training.trainable_abs)
    assert decay["llm"]["shared"] and decay["llm"]["lm_head"]  # weight decay 0.05 on them too

    module, _, paths = _trainable_paths(_tiny("scanqa_flant5xl"))
    assert module.config.llm.activation == "gelu_new"  # FlanT5's own tanh approximation
    assert {p for p in paths if p.startswith("llm/")} == {"llm/loc_embed", "llm/loc_head"}


def test_release_steps_update_the_vocabulary_and_leave_the_t5_body_alone():
    config = _tiny("scanqa_3dllm_release", **{"optim.steps_per_epoch": 2, "total_steps": 4})
    module, _ = setup.build_model(config)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    training = setup.build_training(config, mesh, module)
    data = setup.build_data(config, mesh, module.config, train=True)
    batch = next(data)
    data_sh = sharding.batch_sharding(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data_sh), batch
    )
    compiled = setup.compile_train_step(config, mesh, training, abstract)
    with jax.set_mesh(mesh):
        state, frozen = state_lib.init_random(
            training.init_fn,
            training.tx,
            training.patterns,
            training.state_sh,
            training.frozen_sh,
            jax.random.key(0),
        )
        before = jax.device_get((state.params, frozen))
        lrs = []
        for _ in range(2):
            state, metrics = compiled(state, frozen, batch, jax.random.key(1))
            lrs.append(float(metrics["lr"]))
            batch = next(data)
    after = jax.device_get(state.params)
    for name in ("shared", "lm_head", "loc_embed", "loc_head"):
        assert not np.array_equal(before[0]["llm"][name], after["llm"][name]), name
    for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(jax.device_get(frozen))):
        np.testing.assert_array_equal(a, b)
    assert lrs == pytest.approx([1e-8, 1e-8 + (1e-4 - 1e-8) / 1000], rel=1e-5)


def test_no_clipping_is_plain_adamw():
    params = {"w": np.ones((3, 2), np.float32)}
    # Norms ~2450 then ~245: clipped to 1 both times, the two steps differ from plain AdamW's
    # (Adam alone is blind to a constant scale of the gradients).
    grads = [{"w": np.full((3, 2), g, np.float32)} for g in (1e3, 1e2)]
    plain = optax.adamw(1e-3, b1=0.9, b2=0.999, weight_decay=0.05)
    for clip, same in ((0.0, True), (1.0, False)):
        tx = optimizer.make_optimizer(
            params,
            optax.constant_schedule(1e-3),
            b1=0.9,
            b2=0.999,
            weight_decay=0.05,
            grad_clip=clip,
        )
        state, ref_state = tx.init(params), plain.init(params)
        for g in grads:
            updates, state = tx.update(g, state, params)
            ref, ref_state = plain.update(g, ref_state, params)
        assert np.allclose(updates["w"], ref["w"]) == same
        assert len(state) == 2  # one state layout whether or not it clips


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"profile": "lavis"}, "config.profile must be one of"),
        ({"optim.grad_clip": -1.0}, "config.optim.grad_clip must be >= 0"),
        ({"optim.steps_per_epoch": 0}, "config.optim.steps_per_epoch must be >= 1"),
        ({"optim.first_epoch": 60}, "runs past the release schedule's last epoch"),
        ({"total_steps": 100 * 799 + 1}, "runs past the release schedule's last epoch"),
    ],
)
def test_release_settings_are_checked(overrides, message):
    with pytest.raises(InputError, match=message):
        config_checks.check_config(_config("scanqa_3dllm_release", **overrides))


def test_release_profile_needs_its_epoch_settings():
    config = _config("scanqa_flant5xl", profile="release")
    with pytest.raises(InputError, match="needs config.optim.warmup_lr, config.optim.steps"):
        config_checks.check_config(config)


def test_release_profile_is_for_t5():
    # one line that says what to do (it was a bare ValueError about the T5-only activation)
    with pytest.raises(InputError, match="release.*FlanT5.*DecoderConfig.*profile 'ours'"):
        setup.build_model(_tiny("scanqa_3dllm_release", **{"model.preset": "tiny_decoder"}))
    assert llm3d.RELEASE_TRAINABLE[: len(llm3d.TRAINABLE)] == llm3d.TRAINABLE
