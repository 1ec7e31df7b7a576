r"""Generation speed at the demo config: prefill time, KV-cached decode tokens/s, and the ratio to
generation without the KV cache, measured side by side in this process.

    python -m tools.bench.decode [--repeats 5] [--batch 8] [--new_tokens 24]

Model: `LLM3DConfig.tiny()` (the demo), random weights; shapes from experiments/configs/demo.py
(batch 8, 256 points, 32 prompt tokens, 24 answer tokens). `eos_id = -1` never matches, so every
row decodes the full length. Compared programs (all jitted, compile excluded, median of repeats):
  prefill     Q-Former + T5 encoder + first decoder step (`llm3d.prefill`)
  cached      prefill + greedy loop over `llm3d.decode_step` (what `infer.generate` runs)
  no cache    encoder once, then per step the T5 decoder over the whole answer buffer
  recompute   per step the whole model (Q-Former, encoder, decoder) from scratch
decode tokens/s = B x (new_tokens - 1) / (cached - prefill). Greedy tokens must agree.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    from experiments.configs import demo
    from llm3d_jax.infer.decode import DecodeConfig, greedy_decode
    from llm3d_jax.model import llm3d
    from llm3d_jax.model.t5 import shift_right

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--new_tokens", type=int)
    args = parser.parse_args(argv)
    c = demo.get_config()
    batch = args.batch or c.batch_size
    length = args.new_tokens or c.data.answer_len
    num_points, prompt_len = c.data.num_points, c.data.prompt_len

    cfg = llm3d.LLM3DConfig.tiny()
    module = llm3d.LLM3D(cfg)
    params = llm3d.init_params(module, seed=0)
    rng = np.random.default_rng(0)
    inputs = dict(
        features=jnp.asarray(rng.normal(size=(batch, num_points, cfg.feature_dim)), jnp.float32),
        voxels=jnp.asarray(rng.integers(0, 256, (batch, num_points, 3)), jnp.int32),
        point_mask=jnp.ones((batch, num_points), bool),
        prompt_ids=jnp.asarray(rng.integers(2, cfg.llm.loc_offset, (batch, prompt_len)), jnp.int32),
        prompt_mask=jnp.ones((batch, prompt_len), bool),
    )
    config = DecodeConfig(max_new_tokens=length, eos_id=-1, pad_id=0)
    start_id = cfg.llm.decoder_start_token_id

    @jax.jit
    def prefill(params, inputs):
        return llm3d.prefill(module, params, **inputs, max_decode_len=length)

    @jax.jit
    def cached(params, inputs):
        cache, logits0 = llm3d.prefill(module, params, **inputs, max_decode_len=length)
        step = functools.partial(llm3d.decode_step, module, params)
        return greedy_decode(step, cache, logits0, max_len=length, eos_id=config.eos_id, pad_id=0)[
            0
        ]

    @jax.jit
    def no_cache(params, inputs):
        encoded, mask = module.apply({"params": params}, **inputs, method=llm3d.LLM3D.encode)
        answer_mask = jnp.ones((batch, length), bool)

        def body(t, ids):
            logits = module.apply(
                {"params": params},
                encoded,
                mask,
                shift_right(ids, start_id),
                answer_mask,
                method=lambda m, *a: m.llm.decode(*a),
            )
            return ids.at[:, t].set(jnp.argmax(logits[:, t], -1).astype(jnp.int32))

        return jax.lax.fori_loop(0, length, body, jnp.zeros((batch, length), jnp.int32))

    @jax.jit
    def recompute(params, inputs):
        answer_mask = jnp.ones((batch, length), bool)

        def body(t, ids):
            logits = module.apply(
                {"params": params}, **inputs, answer_ids=ids, answer_mask=answer_mask
            )
            return ids.at[:, t].set(jnp.argmax(logits[:, t], -1).astype(jnp.int32))

        return jax.lax.fori_loop(0, length, body, jnp.zeros((batch, length), jnp.int32))

    t_prefill = median_seconds(lambda: prefill(params, inputs), args.repeats)
    t_cached = median_seconds(lambda: cached(params, inputs), args.repeats)
    t_no_cache = median_seconds(lambda: no_cache(params, inputs), args.repeats)
    t_recompute = median_seconds(lambda: recompute(params, inputs), args.repeats)
    ids = [np.asarray(f(params, inputs)) for f in (cached, no_cache, recompute)]
    agree = all(np.array_equal(ids[0], other) for other in ids[1:])

    tokens = batch * length
    decode_tps = batch * (length - 1) / max(t_cached - t_prefill, 1e-9)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
        f"B={batch}, N={num_points}, Lp={prompt_len}, {length} new tokens, repeats {args.repeats}"
    )
    print(f"prefill                 {t_prefill * 1e3:9.2f} ms")
    print(f"decode (KV cache)       {decode_tps:9.0f} tokens/s  (after prefill)")
    print(f"generate, KV cache      {t_cached * 1e3:9.2f} ms  {tokens / t_cached:9.0f} tokens/s")
    print(
        f"generate, no cache      {t_no_cache * 1e3:9.2f} ms  {tokens / t_no_cache:9.0f} tokens/s"
        f"  -> KV cache is {t_no_cache / t_cached:.2f}x faster"
    )
    print(
        f"generate, recompute all {t_recompute * 1e3:9.2f} ms  {tokens / t_recompute:9.0f} tokens/s"
        f"  -> KV cache is {t_recompute / t_cached:.2f}x faster"
    )
    print(f"same greedy tokens in all three: {agree}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
