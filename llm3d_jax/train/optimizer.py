"""What trains (a regex table over parameter paths) and how (optax AdamW, warmup + cosine: ours
per step, or the released 3D-LLM's per epoch).

Params are split into two pytrees: `trainable` (the optimizer's whole world: it has state only
for these and gradients are taken only with respect to these) and `frozen` (the base weights,
never updated, never checkpointed). `merge` puts them back together for `module.apply`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from llm3d_jax.fileio import InputError


def param_paths(params) -> list[str]:
    """'/'-joined paths of every leaf, e.g. 'qformer/layer_0/attention/query/kernel'."""
    return ["/".join(k) for k in traverse_util.flatten_dict(params)]


def check_trainable_patterns(params, patterns: Sequence[str]) -> None:
    """Every pattern must match at least one parameter path (a typo must not silently freeze)."""
    paths = param_paths(params)
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise InputError(None, f"config.trainable: bad regex {pattern!r} ({err})") from None
        if not any(regex.fullmatch(p) for p in paths):
            raise InputError(
                None,
                f"config.trainable: {pattern!r} matches no parameter "
                f"(paths look like {paths[0]!r})",
            )


def split_trainable(params, patterns: Sequence[str]):
    """-> (trainable, frozen): nested dicts holding the leaves whose path fullmatches a pattern,
    and the rest. Either may be empty."""
    regexes = [re.compile(p) for p in patterns]
    trainable, frozen = {}, {}
    for key, leaf in traverse_util.flatten_dict(params).items():
        path = "/".join(key)
        (trainable if any(r.fullmatch(path) for r in regexes) else frozen)[key] = leaf
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable, frozen):
    """Inverse of `split_trainable`."""
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def weight_decay_mask(params):
    """Decay matrices and embeddings only; biases, norm scales (all 1-D) are not decayed."""
    return traverse_util.unflatten_dict(
        {k: v.ndim >= 2 for k, v in traverse_util.flatten_dict(params).items()}
    )


def make_schedule(
    *, lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine down to `min_lr` at `total_steps`."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=min_lr,
    )


def make_release_schedule(
    *,
    lr: float,
    min_lr: float,
    warmup_lr: float,
    warmup_steps: int,
    steps_per_epoch: int,
    max_epoch: int,
    first_epoch: int = 0,
) -> optax.Schedule:
    """The released 3D-LLM's LAVIS `LinearWarmupCosineLRScheduler`, as its runner steps it
    before each iteration i of epoch e; step t (0 = the first update) is e = first_epoch +
    t // steps_per_epoch, i = t % steps_per_epoch.

    e == 0: linear warm-up per step, min(lr, warmup_lr + (lr - warmup_lr) i / warmup_steps),
            cut off by the end of the epoch when that comes first (LAVIS assumes it does not);
    e > 0:  cosine per epoch (constant within one), min_lr + (lr - min_lr)(1 + cos(pi e /
            max_epoch)) / 2; LAVIS stops after epoch max_epoch - 1 (config_checks holds
            total_steps to that).
    `first_epoch` > 0 reproduces LAVIS resuming a checkpoint (at its epoch + 1): no warm-up.
    """

    def schedule(count):
        count = jnp.asarray(count)
        epoch = first_epoch + count // steps_per_epoch
        i = count % steps_per_epoch
        warm = jnp.minimum(lr, warmup_lr + (lr - warmup_lr) * i / max(warmup_steps, 1))
        cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / max_epoch))
        return jnp.where(epoch == 0, warm, cosine)

    return schedule


def make_optimizer(
    trainable,
    schedule: optax.Schedule,
    *,
    b1: float,
    b2: float,
    weight_decay: float,
    grad_clip: float,
) -> optax.GradientTransformation:
    """Global-norm clipping (`grad_clip` 0: none, as the released 3D-LLM), then AdamW with
    decoupled weight decay on matrices only.

    `trainable` (arrays or ShapeDtypeStructs) gives the tree the weight-decay mask is built on.
    Without clipping an identity takes its place, so the state keeps one layout (AdamW's is
    `opt_state[1]`).
    """
    return optax.chain(
        optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
        optax.adamw(
            schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=weight_decay_mask(trainable)
        ),
    )


def _is_adam(node) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def adam_state(opt_state) -> optax.ScaleByAdamState:
    """The one `ScaleByAdamState` (count, mu, nu) inside an optimizer state of `make_optimizer`."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(s)]
    if len(found) != 1:
        raise ValueError(f"expected one Adam state in the optimizer state, found {len(found)}")
    return found[0]


def with_adam_moments(opt_state, mu, nu, count: int):
    """`opt_state` with its Adam moments and count replaced (a resumed torch AdamW: `exp_avg` ->
    mu, `exp_avg_sq` -> nu, `step` -> count). mu and nu must have the trainable params' tree.

    optax.adamw and torch.optim.AdamW (LAVIS's) compute the same update from these: both keep
    m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2, bias-correct with the count after the
    increment (torch's `step` is incremented before use as optax's `count` is), and divide by
    sqrt(v / (1 - b2^t)) + eps, eps outside the square root and after the correction (torch
    writes it as sqrt(v) / sqrt(1 - b2^t) + eps: the same number; optax's eps_root is 0). The
    decoupled weight decay is lr * wd * param on the pre-update param in both (torch multiplies
    the param by 1 - lr * wd first). tests/train/test_lavis_finetune.py checks one step against
    torch's."""
    adam = adam_state(opt_state)
    for name, new, old in (("mu", mu, adam.mu), ("nu", nu, adam.nu)):
        if jax.tree.structure(new) != jax.tree.structure(old):
            raise ValueError(f"Adam {name}: tree differs from the trainable params'")
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
            if a.shape != b.shape:
                raise ValueError(f"Adam {name}: shape {a.shape} where the param has {b.shape}")
    new = adam._replace(
        count=jnp.asarray(count, dtype=adam.count.dtype),
        mu=jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), mu, adam.mu),
        nu=jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), nu, adam.nu),
    )
    return jax.tree.map(lambda s: new if _is_adam(s) else s, opt_state, is_leaf=_is_adam)
