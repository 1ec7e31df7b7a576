"""Train-step throughput and MFU on this machine, and compiled memory of FlanT5-XL on 8 devices.

    python -m tools.bench.train_step                 # demo + compute-bound configs, XL memory
    python -m tools.bench.train_step --only speed    # or: --only memory
    python -m tools.bench.train_step --only memory --scan-layers   # T5 blocks under nn.scan

Throughput runs the real jitted train step (tiny-model demo config, and a config whose matmuls
are large enough to be compute-bound) on synthetic batches and prints step time, tokens/s and
MFU, i.e. the ratio of the model FLOP/s to a peak measured side by side in the same process
(a jitted f32 2048^2 matmul on CPU; the datasheet bf16 number on GPU/TPU, with the measured
bf16 matmul printed next to it). Memory compiles the FlanT5-XL 3D-LLM train step from
ShapeDtypeStructs only (no weights) on (8,1,1) and (1,8,1) meshes and prints XLA's memory
analysis per device and the compile time (`--scan-layers`: the blocks run under nn.scan).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "jax" not in sys.modules and "XLA_FLAGS" not in os.environ:
    # 8 simulated CPU devices for the memory analysis; no effect on GPU/TPU hosts.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    if sys.argv[1:3] == ["--only", "memory"]:
        # Nothing runs: LLVM code quality does not matter, and buffer sizes do not depend on it.
        os.environ["XLA_FLAGS"] += (
            " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        )

import jax
import jax.numpy as jnp

from llm3d_jax.model import llm3d, qformer, t5
from llm3d_jax.train import metrics, setup, sharding, synthetic
from llm3d_jax.train import state as state_lib

GIB = 1 << 30


def demo_model():
    from experiments.configs import demo

    c = demo.get_config()
    cfg = llm3d.LLM3DConfig.tiny()
    return "demo (tiny)", cfg, c.batch_size, c.data.num_points, c.data.prompt_len, c.data.answer_len


def compute_bound_model():
    """Wide enough that the step is dominated by matmuls (a ~100M-parameter model)."""
    cfg = llm3d.LLM3DConfig(
        qformer=qformer.QFormerConfig(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            intermediate_size=2048,
            encoder_hidden_size=512,
            num_query_tokens=32,
        ),
        llm=t5.T5Config.tiny(
            vocab_size=4096,
            loc_offset=4096,
            loc_bins=256,
            d_model=768,
            d_kv=64,
            d_ff=2048,
            num_layers=4,
            num_decoder_layers=4,
            num_heads=12,
        ),
        feature_dim=512,
    )
    return "compute-bound (~100M)", cfg, 16, 512, 64, 32


def xl_model():
    return llm3d.LLM3DConfig.flan_t5_xl(), 8, 5000, 64, 40


def step_config(batch_size, microbatches, shapes):
    """experiments/configs/demo.py with the bench's batch and shapes, the model's own trainable
    table (`llm3d.TRAINABLE`) and a fixed schedule: the run config `build_step` sets up from."""
    from experiments.configs import demo

    c = demo.get_config()
    c.data_source = "synthetic"  # what bench_speed feeds: no per-point targets in the batch
    c.batch_size, c.microbatches, c.total_steps = batch_size, microbatches, 1000
    c.data.num_points, c.data.prompt_len, c.data.answer_len = shapes
    c.trainable = ()
    c.optim.update(lr=1e-4, min_lr=1e-5, warmup_steps=10, weight_decay=0.05, grad_clip=1.0)
    return c


def build_step(cfg, mesh, batch_size, microbatches, dtype, remat, shapes, scan_layers=False):
    """The train step experiments/train.py compiles (`llm3d_jax.train.setup`), for model config
    `cfg`, compiled from ShapeDtypeStructs only -> dict(cfg, module, compiled, init_fn, tx,
    patterns, state_sh, frozen_sh, trainable_abs, frozen_abs)."""
    cfg = llm3d.with_overrides(cfg, dtype=dtype, remat=remat, scan_layers=scan_layers)
    module = llm3d.LLM3D(cfg)
    config = step_config(batch_size, microbatches, shapes)
    training = setup.build_training(config, mesh, module)
    batch_abs = setup.abstract_batch(config, cfg, mesh)
    compiled = setup.compile_train_step(config, mesh, training, batch_abs)
    return dict(
        cfg=cfg,
        module=module,
        compiled=compiled,
        init_fn=training.init_fn,
        tx=training.tx,
        patterns=training.patterns,
        state_sh=training.state_sh,
        frozen_sh=training.frozen_sh,
        trainable_abs=training.trainable_abs,
        frozen_abs=training.frozen_abs,
    )


def measure_bf16_matmul(size=8192, repeats=10):
    x = jnp.ones((size, size), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        y = f(x)
    y.block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def bench_speed(name, cfg, batch_size, shapes, dtype, steps, peak):
    mesh = sharding.make_mesh((-1, 1, 1))
    built = build_step(cfg, mesh, batch_size, 1, dtype, False, shapes)
    num_points, prompt_len, answer_len = shapes
    data = synthetic.SyntheticBatches(
        batch_size=batch_size,
        num_points=num_points,
        feature_dim=built["cfg"].feature_dim,
        prompt_len=prompt_len,
        answer_len=answer_len,
        vocab_size=built["cfg"].llm.loc_offset,
        answer_offset=built["cfg"].llm.loc_offset,
        seed=0,
        sharding=sharding.batch_sharding(mesh),
    )
    batches = [next(data) for _ in range(2)]
    with jax.set_mesh(mesh):
        state, frozen = state_lib.init_random(
            built["init_fn"],
            built["tx"],
            built["patterns"],
            built["state_sh"],
            built["frozen_sh"],
            jax.random.key(0),
        )
        rng = jax.random.key(1)
        for i in range(2):  # warm-up
            state, m = built["compiled"](state, frozen, batches[i % 2], rng)
        jax.block_until_ready(m)
        start = time.perf_counter()
        for i in range(steps):
            state, m = built["compiled"](state, frozen, batches[i % 2], rng)
        jax.block_until_ready(m)
    step_time = (time.perf_counter() - start) / steps
    flops = batch_size * metrics.llm3d_flops(built["cfg"].qformer, built["cfg"].llm, *shapes)
    xla_flops = built["compiled"].cost_analysis().get("flops", float("nan"))
    tokens = batch_size * (prompt_len + answer_len)
    print(
        f"{name:24s} {dtype:8s} batch {batch_size:3d}: step {step_time * 1e3:9.1f} ms, "
        f"{tokens / step_time:10.0f} tokens/s, model {flops / 1e9:8.2f} GFLOP/step "
        f"(XLA counts {xla_flops / 1e9:8.2f}), MFU {flops / step_time / peak:6.1%}"
    )


def bench_memory(batch_size=8, scan_layers=False):
    cfg, _, num_points, prompt_len, answer_len = xl_model()
    shapes = (num_points, prompt_len, answer_len)
    for mesh_shape in ((8, 1, 1), (1, 8, 1)):
        mesh = sharding.make_mesh(mesh_shape, jax.devices()[:8])
        start = time.perf_counter()
        built = build_step(cfg, mesh, batch_size, 1, "bfloat16", True, shapes, scan_layers)
        mem = built["compiled"].memory_analysis()
        count = lambda t: sum(x.size for x in jax.tree.leaves(t))
        print(
            f"FlanT5-XL 3D-LLM, mesh {mesh_shape}, batch {batch_size}, {num_points} points, bf16 + remat"
            f"{' + scan' * scan_layers} "
            f"({count(built['trainable_abs']) / 1e6:.0f}M trainable, {count(built['frozen_abs']) / 1e9:.2f}B frozen), "
            f"compiled in {time.perf_counter() - start:.0f} s; per device: "
            f"arguments {mem.argument_size_in_bytes / GIB:.2f} GiB, outputs {mem.output_size_in_bytes / GIB:.2f} GiB, "
            f"temporaries {mem.temp_size_in_bytes / GIB:.2f} GiB, aliased {mem.alias_size_in_bytes / GIB:.2f} GiB"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("speed", "memory"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--xl-speed", action="store_true", help="also time the FlanT5-XL step (GPU/TPU)"
    )
    parser.add_argument(
        "--scan-layers", action="store_true", help="memory: T5 blocks under nn.scan"
    )
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}")
    if args.only != "memory":
        peak, source = metrics.peak_flops()
        print(f"peak {peak / 1e12:.3f} TFLOP/s ({source})")
        if device.platform != "cpu":
            print(
                f"measured bf16 8192^3 matmul: {measure_bf16_matmul() / 1e12:.1f} TFLOP/s per device"
            )
        dtype = "float32" if device.platform == "cpu" else "bfloat16"
        for name, cfg, batch, *shapes in (demo_model(), compute_bound_model()):
            bench_speed(name, cfg, batch, shapes, dtype, args.steps, peak)
        if args.xl_speed:
            cfg, batch, *shapes = xl_model()
            bench_speed("FlanT5-XL 3D-LLM", cfg, batch, shapes, dtype, args.steps, peak)
    if args.only != "speed" and device.platform == "cpu":
        bench_memory(scan_layers=args.scan_layers)


if __name__ == "__main__":
    main()
