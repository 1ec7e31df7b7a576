"""Sharded creation of the train state: `jax.eval_shape` -> logical shardings -> jitted init.

Nothing here allocates a full unsharded copy on one device: random init runs inside `jax.jit`
with `out_shardings`, and pretrained weights go straight from host memory to their shards.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from llm3d_jax.train import optimizer, sharding
from llm3d_jax.train.step import TrainState


def abstract_params(init_fn: Callable[[jax.Array], dict]):
    """`init_fn(rng)` -> boxed params (`nn.LogicallyPartitioned` leaves); shapes only, no FLOPs."""
    return jax.eval_shape(init_fn, jax.random.key(0))


def param_shardings(boxed_abstract, mesh, patterns):
    """-> (trainable abstract, frozen abstract, trainable shardings, frozen shardings)."""
    shardings = sharding.logical_shardings(boxed_abstract, mesh)
    abstract = nn.meta.unbox(boxed_abstract)
    trainable_abs, frozen_abs = optimizer.split_trainable(abstract, patterns)
    trainable_sh, frozen_sh = optimizer.split_trainable(shardings, patterns)
    return trainable_abs, frozen_abs, trainable_sh, frozen_sh


def state_shardings(tx: optax.GradientTransformation, trainable_abs, trainable_sh, mesh):
    """Shardings of the whole TrainState: optimizer moments follow their params, scalars replicate."""
    opt_abs = jax.eval_shape(tx.init, trainable_abs)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        opt_abs,
        trainable_sh,
        transform_non_params=lambda _: sharding.replicated(mesh),
    )
    return TrainState(step=sharding.replicated(mesh), params=trainable_sh, opt_state=opt_sh)


def abstract_state(tx, trainable_abs, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: what a checkpoint restore and AOT compilation take."""
    shapes = jax.eval_shape(
        lambda p: TrainState(step=jnp.int32(0), params=p, opt_state=tx.init(p)), trainable_abs
    )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


def init_random(init_fn, tx, patterns, shardings: TrainState, frozen_sh, rng):
    """Random init of everything, directly into shards -> (state, frozen)."""

    def init(rng):
        params = nn.meta.unbox(init_fn(rng))
        trainable, frozen = optimizer.split_trainable(params, patterns)
        return TrainState(step=jnp.int32(0), params=trainable, opt_state=tx.init(trainable)), frozen

    return jax.jit(init, out_shardings=(shardings, frozen_sh))(rng)


def init_from_params(params, tx, patterns, shardings: TrainState, frozen_sh, moments=None):
    """Pretrained (host) params -> (state, frozen), each array placed on its shards.

    `moments`: None (Adam starts from zero moments), or (mu, nu, count) with mu and nu trees of
    (some of) the params' paths, a released checkpoint's AdamW state
    (`convert.lavis.LavisMoments`): their trainable part becomes the Adam state, zeros for the
    trainable params they lack, and count the Adam count, so training goes on from them."""
    trainable, frozen = optimizer.split_trainable(params, patterns)
    frozen = jax.device_put(frozen, frozen_sh)
    trainable = jax.device_put(trainable, shardings.params)
    if moments is None:
        state = jax.jit(
            lambda p: TrainState(step=jnp.int32(0), params=p, opt_state=tx.init(p)),
            out_shardings=shardings,
        )(trainable)
        return state, frozen
    mu, nu, count = moments
    # Only what the saved state reaches travels; the trainable params it does not reach get
    # zero moments on their shards (a checkpoint's frozen-here params are dropped).
    flat_sh = traverse_util.flatten_dict(shardings.params)
    keep = lambda tree: {k: v for k, v in traverse_util.flatten_dict(tree).items() if k in flat_sh}
    mu, nu = keep(mu), keep(nu)
    mu = jax.device_put(mu, {k: flat_sh[k] for k in mu})
    nu = jax.device_put(nu, {k: flat_sh[k] for k in nu})

    def init(p, m, v):
        flat = traverse_util.flatten_dict(p)
        full = lambda saved: traverse_util.unflatten_dict(
            {k: saved[k] if k in saved else jnp.zeros_like(x) for k, x in flat.items()}
        )
        opt_state = optimizer.with_adam_moments(tx.init(p), full(m), full(v), count)
        return TrainState(step=jnp.int32(0), params=p, opt_state=opt_state)

    return jax.jit(init, out_shardings=shardings)(trainable, mu, nu), frozen
