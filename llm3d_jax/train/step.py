"""Train state, the answer-token loss, and the train / eval step functions (pure, jit-able).

A batch is a dict with `features` [B,N,D], `voxels` [B,N,3], `point_mask` [B,N], `prompt_ids`,
`prompt_mask` [B,Lp], `answer_ids`, `answer_mask` [B,La]; the model returns logits [B,La,V] with
`logits[:, t]` scoring `answer_ids[:, t]`.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from llm3d_jax.train import optimizer, sharding

MODEL_INPUTS = (
    "features",
    "voxels",
    "point_mask",
    "prompt_ids",
    "prompt_mask",
    "answer_ids",
    "answer_mask",
)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (frozen base weights live outside it)."""

    step: jax.Array  # int32 []
    params: Any  # trainable params only
    opt_state: Any


def answer_loss_sums(logits, answer_ids, answer_mask):
    """-> (sum of cross-entropy, number of correct argmax tokens, number of tokens) over the
    masked answer tokens. Sums (not means) so that microbatches add up exactly."""
    logits = logits.astype(jnp.float32)
    mask = answer_mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, answer_ids)
    correct = (jnp.argmax(logits, axis=-1) == answer_ids).astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(correct * mask), jnp.sum(mask)


def _model_inputs(batch):
    return {k: batch[k] for k in MODEL_INPUTS}


def rating_loss_sums(ratings, point_target, point_mask, answer_mask, role_ratings=None):
    """-> (sum of per-point binary cross-entropy, number of points) of the point ratings
    [B,N] (`LLM3DConfig.target_tokens`) against `point_target` [B,N] (> 0: a named object's
    point), over the real points of rows that carry an answer (eval padding rows carry none).
    With `role_ratings` [B,N,R] (`object_roles`), each point adds the cross-entropy of its R
    role ratings, role r's target `point_target == r + 1`."""
    weight = point_mask.astype(jnp.float32) * jnp.any(answer_mask, axis=1, keepdims=True)
    target = jnp.asarray(point_target)
    bce = optax.sigmoid_binary_cross_entropy(ratings, (target > 0).astype(jnp.float32))
    if role_ratings is not None:
        roles = jnp.arange(1, role_ratings.shape[-1] + 1, dtype=target.dtype)
        role_target = (target[..., None] == roles).astype(jnp.float32)  # [B,N,R]
        bce = bce + jnp.sum(optax.sigmoid_binary_cross_entropy(role_ratings, role_target), -1)
    return jnp.sum(bce * weight), jnp.sum(weight)


def make_train_step(
    module: nn.Module,
    tx: optax.GradientTransformation,
    schedule,
    microbatches: int,
    rating_weight: float = 1.0,
    role_teacher: float = 0.0,
):
    """-> train_step(state, frozen, batch, rng) -> (state, metrics).

    Gradients are taken only with respect to `state.params`; with `microbatches > 1` the batch is
    split into that many interleaved slices (rows m, m+M, ...: every slice stays spread over all
    data-parallel devices), gradients are summed in fp32 by a `lax.scan`, and the result equals
    the full-batch gradient of the mean token loss.

    A model with `target_tokens` rates every point against the prompt; when the batch has
    `point_target` (the tfds pipeline), the loss adds `rating_weight` x the mean per-point
    cross-entropy of those ratings (`rating_loss_sums`).
    """
    config = getattr(module, "config", None)  # stand-in modules of the tests have none
    rates_points = bool(getattr(config, "target_tokens", 0)) and rating_weight > 0

    def sums_fn(params, frozen, batch, rng):
        variables = {"params": optimizer.merge(params, frozen)}
        inputs = _model_inputs(batch)
        if not (rates_points and "point_target" in batch):
            logits = module.apply(variables, **inputs, deterministic=False, rngs={"dropout": rng})
            zero = jnp.float32(0)
            return (
                *answer_loss_sums(logits, batch["answer_ids"], batch["answer_mask"]),
                zero,
                zero,
            )
        if role_teacher > 0 and getattr(config, "object_roles", 0):
            # this share of rows shows the LLM its roles' true boxes: it learns to read the
            # geometry while the role ratings are still learning to find the objects
            rows = batch["point_target"].shape[0]
            taught = jax.random.bernoulli(jax.random.fold_in(rng, 1), role_teacher, (rows,))
            inputs["role_target"] = jnp.where(taught[:, None], batch["point_target"], -1)
        logits, inter = module.apply(
            variables, **inputs, deterministic=False, rngs={"dropout": rng}, mutable="intermediates"
        )
        ratings = inter["intermediates"]["point_ratings"][0]
        roles = inter["intermediates"].get("role_ratings", (None,))[0]
        rating = rating_loss_sums(
            ratings, batch["point_target"], batch["point_mask"], batch["answer_mask"], roles
        )
        return (*answer_loss_sums(logits, batch["answer_ids"], batch["answer_mask"]), *rating)

    def train_step(state: TrainState, frozen, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        total_tokens = jnp.maximum(jnp.sum(batch["answer_mask"].astype(jnp.float32)), 1.0)
        total_points = jnp.maximum(
            jnp.sum(
                batch["point_mask"].astype(jnp.float32)
                * jnp.any(batch["answer_mask"], axis=1, keepdims=True)
            ),
            1.0,
        )

        def micro_grads(params, micro, micro_rng):
            def scaled_loss(p):
                sums = sums_fn(p, frozen, micro, micro_rng)
                return sums[0] / total_tokens + rating_weight * sums[3] / total_points, sums

            return jax.grad(scaled_loss, has_aux=True)(params)

        with nn.logical_axis_rules(sharding.RULES):
            if microbatches == 1:
                grads, sums = micro_grads(state.params, batch, rng)
            else:
                micro_batch = jax.tree.map(
                    lambda x: jax.lax.with_sharding_constraint(
                        x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(
                            0, 1
                        ),
                        P(None, sharding.BATCH_AXES),
                    ),
                    batch,
                )

                def body(carry, xs):
                    micro, index = xs
                    g, sums = micro_grads(state.params, micro, jax.random.fold_in(rng, index))
                    carry = jax.tree.map(jnp.add, carry, (g, sums))
                    return carry, None

                zeros = (
                    jax.tree.map(jnp.zeros_like, state.params),
                    tuple(jnp.float32(0) for _ in range(5)),
                )
                (grads, sums), _ = jax.lax.scan(
                    body, zeros, (micro_batch, jnp.arange(microbatches))
                )
        ce, correct, count, rating_sum, rating_count = sums

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": ce / jnp.maximum(count, 1.0),
            "accuracy": correct / jnp.maximum(count, 1.0),
            "answer_tokens": count,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
        }
        if rates_points and "point_target" in batch:
            metrics["rating_loss"] = rating_sum / jnp.maximum(rating_count, 1.0)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(module: nn.Module):
    """-> eval_step(params, frozen, batch) -> (ce sum, correct sum, token count), no dropout."""

    def eval_step(params, frozen, batch):
        with nn.logical_axis_rules(sharding.RULES):
            logits = module.apply(
                {"params": optimizer.merge(params, frozen)},
                **_model_inputs(batch),
                deterministic=True,
            )
        return answer_loss_sums(logits, batch["answer_ids"], batch["answer_mask"])

    return eval_step
