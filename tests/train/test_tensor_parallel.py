"""Tensor parallelism by declaration: on a (1,1,8) mesh (data, fsdp, tensor) of the 8 simulated CPU
devices, the logical constraints on the activations (llm3d_jax/train/sharding.py RULES) give the
one-device logits and split the train step's memory 8 ways where the layout allows.

The model is the tiny 3D-LLM with its LLM's attention made tensor-parallel-shaped (8 query and 8
K/V heads of 16: the tiny presets' 4 query / 2 K/V heads cannot split over 8 devices, real LLMs'
can: Llama-3.2-3B 24 / 8, FlanT5-XL 32). What stays whole on every device: the residual stream
inside a block (gathered for the projections), norms, the location rows (replicated by design)
and the batch (split over data x fsdp only, here 1 x 1)."""

import dataclasses
import importlib.util
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from llm3d_jax.model import llm3d
from llm3d_jax.train import setup, sharding

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADS = {
    "t5": dict(num_heads=8, d_kv=16),
    "llama": dict(num_heads=8, num_kv_heads=8, head_dim=16, hidden_size=128, intermediate_size=256),
}


def _run_config(mesh_shape):
    """experiments/configs/demo.py on synthetic data with the model's default trainable table."""
    path = os.path.join(REPO, "experiments", "configs", "demo.py")
    spec = importlib.util.spec_from_file_location("demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config()
    config.data_source = "synthetic"
    config.mesh = mesh_shape
    config.trainable = ()  # llm3d.TRAINABLE: the LLM frozen, as the released 3D-LLM
    return config


def _model_config(family, num_points):
    tiny = llm3d.LLM3DConfig.tiny() if family == "t5" else llm3d.LLM3DConfig.tiny_decoder(family)
    llm = dataclasses.replace(tiny.llm, **HEADS[family])
    return llm3d.with_overrides(dataclasses.replace(tiny, llm=llm), num_points=num_points)


def _step_memory(family, mesh_shape, devices):
    """Compiled train step -> bytes per device of its arguments without the batch, plus temp."""
    config = _run_config(mesh_shape)
    module = llm3d.LLM3D(_model_config(family, config.data.num_points))
    mesh = sharding.make_mesh(mesh_shape, devices)
    training = setup.build_training(config, mesh, module)
    batch = setup.abstract_batch(config, module.config, mesh)
    compiled = setup.compile_train_step(config, mesh, training, batch)
    memory = compiled.memory_analysis()
    batch_bytes = sum(
        np.prod(b.sharding.shard_shape(b.shape)) * b.dtype.itemsize for b in batch.values()
    )
    return memory.argument_size_in_bytes - batch_bytes + memory.temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_tensor_parallel_mesh_gives_one_device_logits_in_a_quarter_of_the_memory(family):
    one = _step_memory(family, (1, 1, 1), jax.devices()[:1])
    eight = _step_memory(family, (1, 1, 8), jax.devices()[:8])
    print(f"{family}: train step weights + activations per device: one device {one / 2**20:.2f} "
          f"MiB, (1,1,8) mesh {eight / 2**20:.2f} MiB ({eight / one:.3f})")  # fmt: skip
    assert eight <= one / 4

    config = _model_config(family, num_points=16)
    module = llm3d.LLM3D(config)
    params = llm3d.init_params(module, seed=0)
    rng = np.random.default_rng(0)
    inputs = llm3d.example_inputs(config, batch=2, points=16, prompt_len=6, answer_len=5)
    inputs["features"] = rng.standard_normal(inputs["features"].shape).astype(np.float32)
    inputs["voxels"] = rng.integers(0, 64, inputs["voxels"].shape).astype(np.int32)
    inputs["prompt_ids"] = rng.integers(0, 512, inputs["prompt_ids"].shape).astype(np.int32)
    inputs["answer_ids"] = rng.integers(0, 512 + 256, inputs["answer_ids"].shape).astype(np.int32)

    def forward(params, inputs):
        with nn.logical_axis_rules(sharding.RULES):
            return module.apply({"params": params}, **inputs)

    single = np.asarray(jax.jit(forward)(params, inputs))
    mesh = sharding.make_mesh((1, 1, 8), jax.devices()[:8])
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))["params"]
    with jax.set_mesh(mesh):
        sharded = jax.jit(forward)(
            jax.device_put(params, sharding.logical_shardings(boxed, mesh)),
            jax.device_put(inputs, sharding.batch_sharding(mesh)),
        )
    assert sharded.sharding.spec[-1] == "tensor"  # the logits come split over the vocabulary
    np.testing.assert_allclose(np.asarray(sharded), single, rtol=0, atol=1e-5)
