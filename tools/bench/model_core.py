"""Model-core figures: parameter counts, CPU forward time, compiled memory of the big configs.

    python -m tools.bench.model_core [--batch 2 --points 5000 --repeats 5]

Q-Former (this file's part): the tiny test config is run for real; the BLIP-2-sized one
(768 x 12 layers, 32 queries, 1408-d points) is counted with `jax.eval_shape` and compiled
from ShapeDtypeStructs only (XLA cost and memory analysis), and run for real with `--run-large`.
Forward times are printed next to a jitted float32 2048^2 matmul measured in the same process:
"ratio" is the model's achieved FLOP/s over that matmul's FLOP/s (FLOPs from XLA's cost analysis).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm3d_jax.model import qformer


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops_per_s(repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    seconds = _time(jax.jit(lambda x: x @ x), a, repeats=repeats)
    return 2 * 2048**3 / seconds


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def qformer_rows(batch: int, points: int, repeats: int, peak: float, run_large: bool) -> None:
    for name, cfg, n in [
        ("qformer tiny", qformer.QFormerConfig.tiny(), 64),
        ("qformer BLIP-2 size", qformer.QFormerConfig(), points),
    ]:
        module = qformer.QFormer(cfg)
        shapes = qformer.param_shapes(module)
        feats = jax.ShapeDtypeStruct((batch, n, cfg.encoder_hidden_size), jnp.float32)
        mask = jax.ShapeDtypeStruct((batch, n), jnp.int32)
        forward = jax.jit(module.apply)
        compiled = forward.lower({"params": shapes}, feats, mask).compile()
        flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
        memory = compiled.memory_analysis()
        line = f"{name:22s} params {count(shapes) / 1e6:8.3f} M  fwd [{batch},{n},{cfg.encoder_hidden_size}]"
        line += f"  {flops / 1e9:8.2f} GFLOP"
        if memory is not None:
            line += f"  temp {memory.temp_size_in_bytes / 2**20:8.1f} MiB"
        if name.endswith("tiny") or run_large:
            params = qformer.init_params(module)
            f = jax.random.normal(jax.random.key(1), feats.shape, jnp.float32)
            m = jnp.ones(mask.shape, jnp.int32)
            seconds = _time(forward, {"params": params}, f, m, repeats=repeats)
            line += f"  {seconds * 1e3:9.2f} ms  ratio {flops / seconds / peak:6.3f}"
        print(line, flush=True)


def _cast_frozen(tree, mask, dtype):
    """Leaves where `mask` is False cast to `dtype` (arrays or ShapeDtypeStructs)."""

    def cast(x, trainable):
        if trainable:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype)
        return x.astype(dtype)

    return jax.tree.map(cast, tree, mask)


def llm3d_rows(batch: int, points: int, repeats: int, peak: float, run_large: bool) -> None:
    """T5 / whole 3D-LLM (issue 3 part B): params (all / trainable by `llm3d.TRAINABLE`),
    compiled forward FLOPs and memory from ShapeDtypeStructs, CPU time for the tiny config."""
    from llm3d_jax.model import llm3d

    bf16 = llm3d.with_overrides(llm3d.LLM3DConfig(), dtype="bfloat16")
    # frozen_bf16: the frozen LLM weights stored in bfloat16 (no float32 copies in the forward).
    for name, cfg, n, frozen_bf16 in [
        ("3d-llm tiny", llm3d.LLM3DConfig.tiny(), 256, False),
        ("3d-llm FlanT5-XL fp32", llm3d.LLM3DConfig.flan_t5_xl(), points, False),
        ("3d-llm FlanT5-XL bf16", bf16, points, False),
        ("3d-llm XL bf16 frozen16", bf16, points, True),
    ]:
        module = llm3d.LLM3D(cfg)
        shapes = llm3d.abstract_params(module)
        if frozen_bf16:
            shapes = _cast_frozen(shapes, llm3d.trainable_mask(shapes), jnp.bfloat16)
        flags = jax.tree.leaves(llm3d.trainable_mask(shapes))
        trainable = sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(shapes), flags) if t)
        inputs = llm3d.example_inputs(cfg, batch=batch, points=n, prompt_len=64, answer_len=40)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in inputs.items()}
        forward = jax.jit(lambda p, x, m=module: m.apply({"params": p}, **x))
        compiled = forward.lower(shapes, abstract).compile()
        flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
        memory = compiled.memory_analysis()
        line = (
            f"{name:22s} params {count(shapes) / 1e6:9.2f} M (trainable {trainable / 1e6:7.2f} M)"
        )
        line += f"  fwd B={batch} N={n} Lp=64 La=40  {flops / 1e9:9.3f} GFLOP"
        if memory is not None:
            line += f"  args {memory.argument_size_in_bytes / 2**30:6.2f} GiB"
            line += f"  temp {memory.temp_size_in_bytes / 2**30:6.2f} GiB"
        if name.endswith("tiny") or run_large:
            params = llm3d.init_params(module)
            if frozen_bf16:
                params = _cast_frozen(params, llm3d.trainable_mask(params), jnp.bfloat16)
            seconds = _time(forward, params, inputs, repeats=repeats)
            line += f"  {seconds * 1e3:9.2f} ms  ratio {flops / seconds / peak:6.3f}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--points", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-large", action="store_true", help="also time the big configs")
    args = parser.parse_args()
    peak = matmul_flops_per_s(args.repeats)
    print(
        f"device {jax.devices()[0].device_kind}: reference f32 2048^2 matmul {peak / 1e9:.1f} GFLOP/s"
    )
    qformer_rows(args.batch, args.points, args.repeats, peak, args.run_large)
    llm3d_rows(args.batch, args.points, args.repeats, peak, args.run_large)


if __name__ == "__main__":
    main()
