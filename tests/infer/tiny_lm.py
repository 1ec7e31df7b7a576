"""A tiny decoder-only stand-in with the generation interface of `llm3d_jax.model.llm3d`.

Tests only: the decoding loops are checked against it independently of the real model. Sequence
= [prompt (right-padded, masked); answer]; one causal attention layer with learned positions; the
masked mean of the point features is added to every position so the scene matters. Like a real
decoder-only LLM with right-padded prompts, answer positions continue after the last real prompt
token and the first answer token is scored there, so trailing prompt padding changes nothing.

    module.apply({"params": p}, features, voxels, point_mask, prompt_ids, prompt_mask,
                 answer_ids, answer_mask, deterministic=True) -> logits [B,La,V]
    prefill(module, params, *, features, voxels, point_mask, prompt_ids, prompt_mask,
            max_decode_len) -> (cache, logits0 [B,V])
    decode_step(module, params, cache, token_ids [B]) -> (logits [B,V], cache)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class TinyLM(nn.Module):
    vocab: int = 7
    width: int = 16
    feature_dim: int = 8
    max_positions: int = 64

    def setup(self):
        init = nn.initializers.normal(1.0)
        self.embed = self.param("embed", init, (self.vocab, self.width))
        self.pos = self.param("pos", init, (self.max_positions, self.width))
        self.scene = nn.Dense(self.width, name="scene")
        self.q = nn.Dense(self.width, use_bias=False, name="q")
        self.k = nn.Dense(self.width, use_bias=False, name="k")
        self.v = nn.Dense(self.width, use_bias=False, name="v")
        self.head = nn.Dense(self.vocab, name="head")

    def scene_vector(self, features, point_mask):
        m = point_mask[..., None].astype(jnp.float32)
        pooled = jnp.sum(features * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)
        return self.scene(pooled)  # [B,W]

    def hidden(self, ids, positions, scene):
        return self.embed[ids] + self.pos[positions] + scene[:, None]

    def attend(self, h, keys, values, key_mask):
        """h [B,T,W], keys/values [B,S,W], key_mask [B,T,S] -> logits [B,T,V]."""
        s = jnp.einsum("btw,bsw->bts", self.q(h), keys) / jnp.sqrt(self.width)
        s = jnp.where(key_mask, s, -1e9)
        out = jnp.einsum("bts,bsw->btw", jax.nn.softmax(s, -1), values)
        return self.head(h + out)

    def __call__(
        self,
        features,
        voxels,
        point_mask,
        prompt_ids,
        prompt_mask,
        answer_ids,
        answer_mask,
        deterministic=True,
    ):
        del voxels, answer_mask, deterministic
        lp, la = prompt_ids.shape[1], answer_ids.shape[1]
        n = jnp.sum(prompt_mask, 1).astype(jnp.int32)  # real prompt tokens per row
        ids = jnp.concatenate([prompt_ids, answer_ids], 1)
        positions = jnp.concatenate(
            [jnp.broadcast_to(jnp.arange(lp), (len(n), lp)), n[:, None] + jnp.arange(la)], 1
        )
        h = self.hidden(ids, positions, self.scene_vector(features, point_mask))
        valid = jnp.concatenate([prompt_mask.astype(bool), jnp.ones_like(answer_ids, bool)], 1)
        causal = jnp.tril(jnp.ones((lp + la, lp + la), bool))
        logits = self.attend(h, self.k(h), self.v(h), causal[None] & valid[:, None, :])
        # Answer token t is scored at the previous token: the last real prompt token for t = 0.
        where = jnp.concatenate(
            [n[:, None] - 1, lp + jnp.arange(la - 1)[None].repeat(len(n), 0)], 1
        )
        return jnp.take_along_axis(logits, where[:, :, None], 1)

    def prefill(self, features, point_mask, prompt_ids, prompt_mask, max_decode_len):
        b, lp = prompt_ids.shape
        n = jnp.sum(prompt_mask, 1).astype(jnp.int32)
        scene = self.scene_vector(features, point_mask)
        h = self.hidden(prompt_ids, jnp.broadcast_to(jnp.arange(lp), (b, lp)), scene)
        size = lp + max_decode_len
        pad = ((0, 0), (0, max_decode_len), (0, 0))
        keys, values = jnp.pad(self.k(h), pad), jnp.pad(self.v(h), pad)
        valid = jnp.pad(prompt_mask.astype(bool), ((0, 0), (0, max_decode_len)))
        causal = jnp.tril(jnp.ones((lp, size), bool))
        logits = self.attend(h, keys, values, causal[None] & valid[:, None, :])
        cache = dict(
            scene=scene,
            keys=keys,
            values=values,
            valid=valid,
            index=jnp.full((b,), lp, jnp.int32),
            position=n,
        )
        return cache, jnp.take_along_axis(logits, (n - 1)[:, None, None], 1)[:, 0]

    def decode_step(self, cache, token_ids):
        b = token_ids.shape[0]
        index = cache["index"]
        h = self.hidden(token_ids[:, None], cache["position"][:, None], cache["scene"])  # [B,1,W]
        rows = jnp.arange(b)
        keys = cache["keys"].at[rows, index].set(self.k(h)[:, 0])
        values = cache["values"].at[rows, index].set(self.v(h)[:, 0])
        valid = cache["valid"].at[rows, index].set(True)
        visible = valid & (jnp.arange(valid.shape[1])[None] <= index[:, None])
        logits = self.attend(h, keys, values, visible[:, None, :])
        cache = dict(
            scene=cache["scene"],
            keys=keys,
            values=values,
            valid=valid,
            index=index + 1,
            position=cache["position"] + 1,
        )
        return logits[:, 0], cache


def prefill(
    module, params, *, features, voxels, point_mask, prompt_ids, prompt_mask, max_decode_len
):
    del voxels
    return module.apply(
        {"params": params},
        features,
        point_mask,
        prompt_ids,
        prompt_mask,
        max_decode_len,
        method=TinyLM.prefill,
    )


def decode_step(module, params, cache, token_ids):
    return module.apply({"params": params}, cache, token_ids, method=TinyLM.decode_step)


def init(module: TinyLM, seed: int = 0, batch: int = 2, prompt_len: int = 5, num_points: int = 6):
    inputs = example_inputs(module, jax.random.key(seed + 1), batch, prompt_len, num_points)
    answer = jnp.zeros((batch, 3), jnp.int32)
    params = module.init(
        jax.random.key(seed), **inputs, answer_ids=answer, answer_mask=jnp.ones_like(answer)
    )["params"]
    return params, inputs


def example_inputs(module: TinyLM, rng, batch: int, prompt_len: int, num_points: int):
    k1, k2, k3 = jax.random.split(rng, 3)
    lengths = jax.random.randint(k3, (batch,), 1, prompt_len + 1)
    return dict(
        features=jax.random.normal(k1, (batch, num_points, module.feature_dim)),
        voxels=jnp.zeros((batch, num_points, 3), jnp.int32),
        point_mask=jnp.ones((batch, num_points), jnp.int32),
        prompt_ids=jax.random.randint(k2, (batch, prompt_len), 2, module.vocab),
        prompt_mask=(jnp.arange(prompt_len)[None] < lengths[:, None]).astype(jnp.int32),
    )
