"""The train library on a stand-in model: mesh/rules, trainable table, sharded equivalence,
gradient accumulation, frozen weights, checkpoints, metrics."""

import asyncio
import json
import os
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from standin import TRAINABLE, build, run_steps

from llm3d_jax.fileio import InputError
from llm3d_jax.train import checkpoint, metrics, optimizer, sharding


def test_mesh_shape_is_checked():
    assert sharding.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    assert sharding.resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(InputError, match=r"needs 3 devices but 8"):
        sharding.resolve_mesh_shape((3, 1, 1), 8)
    with pytest.raises(InputError, match="does not divide the 8 devices"):
        sharding.resolve_mesh_shape((-1, 3, 1), 8)
    with pytest.raises(InputError, match="3 sizes"):
        sharding.resolve_mesh_shape((8, 1), 8)


def test_batch_must_split_over_data_axes():
    mesh = sharding.make_mesh((2, 2, 2))
    sharding.check_batch(8, 2, mesh)
    with pytest.raises(InputError, match="not divisible by the 4 data-parallel devices"):
        sharding.check_batch(6, 1, mesh)
    with pytest.raises(InputError, match="not divisible by config.microbatches"):
        sharding.check_batch(8, 3, mesh)


def test_rules_cover_the_logical_names_of_the_architecture_doc():
    names = {name for name, _ in sharding.RULES}
    assert names == {
        "batch",
        "embed",
        "mlp",
        "heads",
        "kv",
        "vocab",
        "enc_embed",
        "queries",
        "relpos",
        "norm",
        "layers",
        "pos",
        "length",
    }
    assert all(
        axis is None or set(np.atleast_1d(axis)) <= set(sharding.MESH_AXES)
        for _, axis in sharding.RULES
    )


def test_trainable_table_splits_params_and_rejects_unknown_patterns():
    params = {
        "qformer": {"layer": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}},
        "llm": {"embed": np.zeros((5, 2)), "loc_embed": np.zeros((4, 2))},
    }
    trainable, frozen = optimizer.split_trainable(params, [r"qformer/.*", r"llm/loc_embed"])
    assert optimizer.param_paths(trainable) == [
        "qformer/layer/kernel",
        "qformer/layer/bias",
        "llm/loc_embed",
    ]
    assert optimizer.param_paths(frozen) == ["llm/embed"]
    assert sorted(optimizer.param_paths(optimizer.merge(trainable, frozen))) == sorted(
        optimizer.param_paths(params)
    )
    assert optimizer.weight_decay_mask(trainable)["qformer"]["layer"] == {
        "kernel": True,
        "bias": False,
    }
    optimizer.check_trainable_patterns(params, [r"qformer/.*"])
    with pytest.raises(InputError, match=r"'qformr/\.\*' matches no parameter"):
        optimizer.check_trainable_patterns(params, [r"qformer/.*", r"qformr/.*"])
    with pytest.raises(InputError, match="bad regex"):
        optimizer.check_trainable_patterns(params, [r"(qformer"])


def test_schedule_warms_up_then_decays_to_min_lr():
    schedule = optimizer.make_schedule(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(0.55, abs=0.01)
    assert float(schedule(100)) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def reference():
    """5 steps on a one-device mesh: losses, final trainable params, frozen params."""
    built = build(sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    frozen_before = jax.device_get(built["frozen"])
    state, losses = run_steps(built, 5)
    return dict(
        losses=losses,
        params=jax.device_get(state.params),
        frozen_before=frozen_before,
        frozen_after=jax.device_get(built["frozen"]),
        state=state,
    )


def test_no_optimizer_state_or_update_for_frozen_params(reference):
    trainable_paths = optimizer.param_paths(reference["params"])
    assert trainable_paths and all(
        any(__import__("re").fullmatch(p, path) for p in TRAINABLE) for path in trainable_paths
    )
    adam = reference["state"].opt_state[1][0]  # chain(clip, adamw) -> adamw -> ScaleByAdamState
    assert optimizer.param_paths(adam.mu) == trainable_paths
    assert "llm_embed" in reference["frozen_after"]
    for before, after in zip(
        jax.tree.leaves(reference["frozen_before"]), jax.tree.leaves(reference["frozen_after"])
    ):
        np.testing.assert_array_equal(before, after)
    assert reference["losses"][-1] < reference["losses"][0]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_meshes_match_one_device(reference, mesh_shape):
    built = build(sharding.make_mesh(mesh_shape))
    state, losses = run_steps(built, 5)
    np.testing.assert_allclose(losses, reference["losses"], rtol=2e-5)
    for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(reference["params"])
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_matches_full_batch(reference):
    built = build(sharding.make_mesh((2, 2, 2)), microbatches=2)
    _, losses = run_steps(built, 5)
    np.testing.assert_allclose(losses, reference["losses"], rtol=2e-5)


def test_fingerprint_ignores_sharding_and_sees_one_ulp():
    tree = {"a": np.arange(64, dtype=np.float32).reshape(8, 8) / 7, "b": np.ones(3, np.float32)}
    one = checkpoint.fingerprint(jax.device_put(tree, jax.devices()[0]))
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = jax.device_put(
        tree, {"a": jax.NamedSharding(mesh, jax.P("data", "fsdp")), "b": sharding.replicated(mesh)}
    )
    assert checkpoint.fingerprint(sharded) == one
    tree["a"][3, 5] = np.nextafter(tree["a"][3, 5], np.float32(10))
    assert checkpoint.fingerprint(tree) != one


def test_checkpoint_roundtrip_and_fallback_from_a_corrupt_latest(tmp_path, capsys):
    built = build(sharding.make_mesh((2, 2, 2)))
    manager = checkpoint.make_manager(str(tmp_path), keep=3, save_every=1)
    state, data = built["state"], built["data"]
    meta = {
        "frozen": {"kind": "random_init", "fingerprint": checkpoint.fingerprint(built["frozen"])}
    }
    saved = {}
    with jax.set_mesh(built["mesh"]):
        for step in (1, 2):
            state, _ = built["train_step"](state, built["frozen"], next(data), jax.random.key(1))
            checkpoint.save(manager, step, state, data, meta)
            saved[step] = (jax.device_get(state.params), data.get_state())
    manager.wait_until_finished()

    from llm3d_jax.train import state as state_lib

    abstract = state_lib.abstract_state(built["tx"], built["trainable_abs"], built["state_sh"])
    data.set_state({"index": 0})
    restored, restored_meta = checkpoint.restore_latest(manager, abstract, data)
    assert int(restored.step) == 2 and restored_meta == meta and data.index == saved[2][1]["index"]
    assert (
        restored.params["projection"]["kernel"].sharding
        == built["state_sh"].params["projection"]["kernel"]
    )
    for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(saved[2][0])):
        np.testing.assert_array_equal(a, b)

    # Corrupt step 2: every array file of its state item is truncated.
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 3, 1))
    manager = checkpoint.make_manager(str(tmp_path), keep=3, save_every=1)
    restored, _ = checkpoint.restore_latest(manager, abstract, data)
    assert int(restored.step) == 1 and data.index == saved[1][1]["index"]
    assert "checkpoint step 2" in capsys.readouterr().err


def _restore_that_fails_with_a_read_in_flight(resolve):
    """Runs a restore the way orbax does (a fresh loop, `run_until_complete`, `close`): one
    array fails while another still awaits a tensorstore read; `resolve(loop, promise)` (on a
    thread) completes that read. -> what reached sys.unraisablehook (tensorstore reports errors
    of its done-callbacks there)."""
    promise, read = ts.Promise.new()

    async def fail():
        await asyncio.sleep(0)
        raise ValueError("corrupt array")

    async def restore():
        await asyncio.gather(read, fail())

    unraisable, hook = [], sys.unraisablehook
    sys.unraisablehook = lambda info: unraisable.append(info.exc_value)
    try:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=resolve, args=(loop, promise))
        thread.start()
        try:
            with pytest.raises(ValueError, match="corrupt array"):
                loop.run_until_complete(restore())
        finally:
            loop.close()
        thread.join()
    finally:
        sys.unraisablehook = hook
    return unraisable


def _resolve_after_close(loop, promise):
    """Completes the read once the loop is closed (or has not closed after a second: a loop
    that waits for its reads before closing would wait forever)."""
    for _ in range(100):
        if loop.is_closed():
            break
        time.sleep(0.01)
    promise.set_result(1)


def test_a_failed_restore_leaves_no_read_to_wake_a_closed_loop():
    """Issue 22 case 11: a read that completes after orbax closed the restore's loop prints
    'RuntimeError: Event loop is closed' (hundreds per corrupt step). Inside
    `settled_event_loops` the loop lets that read finish before it closes."""
    errors = _restore_that_fails_with_a_read_in_flight(_resolve_after_close)
    assert [str(e) for e in errors] == ["Event loop is closed"]  # the bug, reproduced
    with checkpoint.settled_event_loops():
        errors = _restore_that_fails_with_a_read_in_flight(_resolve_after_close)
    assert errors == []
    loop = asyncio.new_event_loop()  # the policy is back to asyncio's own
    assert not isinstance(loop, checkpoint._SettlingEventLoop)
    loop.close()


def test_metric_writer_drops_rows_past_the_resume_step_and_plots(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in range(1, 6)) + '{"st'
    )
    writer = metrics.MetricWriter(str(tmp_path), resume_step=3)
    writer.write(4, {"loss": 0.5, "val_loss": 0.7})
    writer.close()
    rows = metrics.read_jsonl(str(path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.5
    metrics.plot_loss(str(path), str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path / "tensorboard")


def test_cpu_peak_is_measured():
    flops = metrics.measure_cpu_peak_flops(size=256, repeats=2)
    assert 1e8 < flops < 1e14


def test_real_model_default_table_trains_location_rows_and_keeps_the_llm_frozen():
    """The tiny LLM3D with its default trainable table: Q-Former/projection/location rows move,
    every other LLM weight stays bit-identical, and the optimizer holds state only for the former."""
    from llm3d_jax.model import llm3d
    from llm3d_jax.train import state as state_lib
    from llm3d_jax.train import step as step_lib
    from llm3d_jax.train import synthetic

    mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])
    module = llm3d.LLM3D(llm3d.LLM3DConfig.tiny(num_points=16))
    cfg = module.config
    init_fn = lambda rng: module.init(rng, **llm3d.example_inputs(cfg), deterministic=True)[
        "params"
    ]
    boxed = state_lib.abstract_params(init_fn)
    trainable_abs, _, trainable_sh, frozen_sh = state_lib.param_shardings(
        boxed, mesh, llm3d.TRAINABLE
    )
    assert "llm" in trainable_abs and set(trainable_abs["llm"]) == {"loc_embed", "loc_head"}
    schedule = optimizer.make_schedule(lr=1e-2, min_lr=1e-3, warmup_steps=0, total_steps=2)
    tx = optimizer.make_optimizer(
        trainable_abs, schedule, b1=0.9, b2=0.999, weight_decay=0.05, grad_clip=1.0
    )
    state_sh = state_lib.state_shardings(tx, trainable_abs, trainable_sh, mesh)
    data = synthetic.SyntheticBatches(
        batch_size=4,
        num_points=16,
        feature_dim=cfg.feature_dim,
        prompt_len=5,
        answer_len=4,
        vocab_size=cfg.llm.loc_offset,
        answer_offset=cfg.llm.loc_offset,
        seed=0,
        sharding=sharding.batch_sharding(mesh),
    )
    with jax.set_mesh(mesh):
        state, frozen = state_lib.init_random(
            init_fn, tx, llm3d.TRAINABLE, state_sh, frozen_sh, jax.random.key(0)
        )
        before = jax.device_get((state.params, frozen))
        train_step = jax.jit(step_lib.make_train_step(module, tx, schedule, 1), donate_argnums=0)
        for _ in range(2):
            state, step_metrics = train_step(state, frozen, next(data), jax.random.key(1))
    assert np.isfinite(float(step_metrics["loss"]))
    for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(jax.device_get(frozen))):
        np.testing.assert_array_equal(a, b)
    after = jax.device_get(state.params)
    assert not np.array_equal(before[0]["llm"]["loc_head"], after["llm"]["loc_head"])
    assert not np.array_equal(before[0]["proj"]["kernel"], after["proj"]["kernel"])
    adam = state.opt_state[1][0]
    assert optimizer.param_paths(adam.mu) == optimizer.param_paths(state.params)


def test_checkpoint_every_zero_saves_no_step_on_its_own(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), keep=2, save_every=0)
    assert manager.should_save(1)  # orbax's initial save of a fresh run
    manager.save(1, args=ocp.args.Composite(**{checkpoint.META: ocp.args.JsonSave({})}))
    manager.wait_until_finished()
    assert not any(manager.should_save(step) for step in (2, 500, 10**6))
    every_3 = checkpoint.make_manager(str(tmp_path / "every_3"), keep=2, save_every=3)
    every_3.save(1, args=ocp.args.Composite(**{checkpoint.META: ocp.args.JsonSave({})}))
    every_3.wait_until_finished()
    assert [s for s in range(2, 8) if every_3.should_save(s)] == [3, 6]
    with pytest.raises(ValueError, match="checkpoint_every"):
        checkpoint.make_manager(str(tmp_path), keep=2, save_every=-1)
