"""Decoder-only backbone (Llama layout) vs the T5 backbone at a similar parameter count.

    python -m tools.bench.decoder [--size tiny|base] [--batch B] [--repeats R]

Both LMs see the 3D-LLM shapes: a prefix of `queries` projected query embeddings plus `prompt`
prompt tokens, and an `answer` of answer tokens. T5: encoder = prefix, decoder = answer;
decoder-only: [prefix; answer] with the loss on the answer (`Decoder.answer_logits`).
- train tokens/s: one jitted AdamW step on every parameter, tokens = B x (prefix + answer);
- decode tokens/s: one jitted generation (prefill + `answer` greedy cached steps in a lax.scan),
  tokens = B x answer generated tokens.
The decoder's layer count is chosen so its parameter count is the closest to the T5's; both
counts are printed. The T5 is the reference measured in the same process: "ratio" is
decoder / T5 throughput. Timings are the best of `--repeats`, the two models alternating, after a
compile + warm-up call.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm3d_jax.model import decoder, t5

SIZES = {
    # d_model, layers per T5 stack, heads, d_ff (gated), vocab
    "tiny": dict(d=64, layers=2, heads=4, ff=128, vocab=512),
    "small": dict(d=256, layers=4, heads=4, ff=704, vocab=8192),
    "base": dict(d=1024, layers=12, heads=16, ff=2816, vocab=32128),
}


def _time_pair(a, a_args, b, b_args, repeats: int) -> tuple[float, float]:
    """Best wall time of each of two jitted calls, alternated so that a shared machine's
    changing load falls on both alike."""
    jax.block_until_ready(a(*a_args))  # compile + warm up
    jax.block_until_ready(b(*b_args))
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, (fn, args) in enumerate(((a, a_args), (b, b_args))):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def configs(size: str, dtype: str, scan_layers: bool):
    s = SIZES[size]
    t5_config = t5.T5Config.tiny(
        vocab_size=s["vocab"],
        d_model=s["d"],
        d_kv=s["d"] // s["heads"],
        d_ff=s["ff"],
        num_layers=s["layers"],
        num_decoder_layers=s["layers"],
        num_heads=s["heads"],
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        dtype=dtype,
    )
    base = decoder.DecoderConfig.tiny(
        "llama",
        vocab_size=s["vocab"],
        hidden_size=s["d"],
        intermediate_size=s["ff"],
        num_heads=s["heads"],
        num_kv_heads=max(1, s["heads"] // 2),
        head_dim=s["d"] // s["heads"],
        dtype=dtype,
        scan_layers=scan_layers,
    )
    t5_count = count(
        t5.abstract_params(t5.T5(t5_config), input_ids=_ids(), decoder_input_ids=_ids())
    )
    best = None
    for layers in range(1, 6 * s["layers"] + 1):
        candidate = dataclasses.replace(base, num_layers=layers)
        n = count(decoder.abstract_params(decoder.Decoder(candidate), input_ids=_ids()))
        if best is None or abs(n - t5_count) < abs(best[1] - t5_count):
            best = (candidate, n)
    return t5_config, t5_count, best[0], best[1]


def _ids():
    return jnp.zeros((1, 1), jnp.int32)


def init(module, **inputs):
    return jax.jit(lambda: nn.unbox(module.init(jax.random.key(0), **inputs))["params"])()


def answer_ce(logits, answer_ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits, answer_ids).mean()


def train_steps(t5_module, dec_module):
    tx = optax.adamw(1e-4)

    def make(loss_fn):
        @jax.jit
        def step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return step

    def t5_loss(params, b):
        encoded = t5_module.apply(
            {"params": params},
            inputs_embeds=b["prefix"],
            attention_mask=b["prefix_mask"],
            method=t5.T5.encode,
        )
        logits = t5_module.apply(
            {"params": params},
            encoded,
            b["prefix_mask"],
            t5.shift_right(b["answer"]),
            method=t5.T5.decode,
        )
        return answer_ce(logits, b["answer"])

    def dec_loss(params, b):
        logits = dec_module.apply(
            {"params": params},
            b["prefix"],
            b["prefix_mask"],
            b["answer"],
            b["answer_mask"],
            method=decoder.Decoder.answer_logits,
        )
        return answer_ce(logits, b["answer"])

    return tx, make(t5_loss), make(dec_loss)


def generators(t5_module, dec_module, steps: int):
    def greedy(step_fn, logits, cache):
        def body(carry, _):
            logits, cache = carry
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            logits, cache = step_fn(cache, token)
            return (logits, cache), token

        _, tokens = jax.lax.scan(body, (logits, cache), length=steps)
        return tokens.T

    @jax.jit
    def t5_generate(params, b):
        v = {"params": params}
        encoded = t5_module.apply(
            v, inputs_embeds=b["prefix"], attention_mask=b["prefix_mask"], method=t5.T5.encode
        )
        cache = t5_module.apply(v, encoded, b["prefix_mask"], steps + 1, method=t5.T5.init_cache)
        step = lambda c, tok: t5_module.apply(v, c, tok, method=t5.T5.decode_step)
        logits, cache = step(cache, jnp.zeros(encoded.shape[:1], jnp.int32))
        return greedy(step, logits, cache)

    @jax.jit
    def dec_generate(params, b):
        v = {"params": params}
        cache, logits = dec_module.apply(
            v,
            inputs_embeds=b["prefix"],
            attention_mask=b["prefix_mask"],
            max_decode_len=steps,
            method=decoder.Decoder.prefill,
        )
        step = lambda c, tok: dec_module.apply(v, c, tok, method=decoder.Decoder.decode_step)
        return greedy(step, logits, cache)

    return t5_generate, dec_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--answer", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan-layers", action="store_true", help="decoder layers under nn.scan")
    args = parser.parse_args()

    t5_config, t5_count, dec_config, dec_count = configs(args.size, args.dtype, args.scan_layers)
    t5_module, dec_module = t5.T5(t5_config), decoder.Decoder(dec_config)
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, dtype {args.dtype}")
    print(
        f"T5 {t5_config.num_layers}+{t5_config.num_decoder_layers} layers d{t5_config.d_model}: "
        f"{t5_count / 1e6:.1f} M params | decoder (llama, GQA {dec_config.num_heads}/"
        f"{dec_config.num_kv_heads}) {dec_config.num_layers} layers{' (scanned)' * args.scan_layers}: {dec_count / 1e6:.1f} M params"
    )
    rng = np.random.default_rng(0)
    b, prefix_len = args.batch, args.queries + args.prompt
    batch = dict(
        prefix=jnp.asarray(rng.standard_normal((b, prefix_len, t5_config.d_model)), jnp.float32),
        prefix_mask=jnp.ones((b, prefix_len), bool),
        answer=jnp.asarray(rng.integers(2, t5_config.vocab_size, (b, args.answer)), jnp.int32),
        answer_mask=jnp.ones((b, args.answer), bool),
    )
    t5_params = init(t5_module, input_ids=_ids(), decoder_input_ids=_ids())
    dec_params = init(dec_module, input_ids=_ids())

    tx, t5_step, dec_step = train_steps(t5_module, dec_module)
    tokens = b * (prefix_len + args.answer)
    t5_state, dec_state = tx.init(t5_params), tx.init(dec_params)
    t5_s, dec_s = _time_pair(
        t5_step,
        (t5_params, t5_state, batch),
        dec_step,
        (dec_params, dec_state, batch),
        args.repeats,
    )
    print(
        f"train  tokens/s: T5 {tokens / t5_s:10.0f}  decoder {tokens / dec_s:10.0f}  "
        f"ratio {t5_s / dec_s:5.2f}   ([{b}, {prefix_len}+{args.answer}] per step)"
    )
    t5_gen, dec_gen = generators(t5_module, dec_module, args.answer)
    t5_s, dec_s = _time_pair(t5_gen, (t5_params, batch), dec_gen, (dec_params, batch), args.repeats)
    generated = b * args.answer
    print(
        f"decode tokens/s: T5 {generated / t5_s:10.0f}  decoder {generated / dec_s:10.0f}  "
        f"ratio {t5_s / dec_s:5.2f}   (prefill {prefix_len} + {args.answer} greedy steps, batch {b})"
    )


if __name__ == "__main__":
    main()
