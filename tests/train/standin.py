"""A tiny stand-in 3D-LLM with the real model's call signature and logical axis names.

The train library is model-agnostic; these tests pin its behaviour (sharding, accumulation,
checkpoints) on a model small enough to compile in a second. The real model is exercised by the
command-line tests through `experiments/train.py`.
"""

import flax.linen as nn
import jax.numpy as jnp

TRAINABLE = (r"qformer_.*", r"query_tokens", r"projection/.*", r"llm_loc_embed")


def _dense(features, names, name, dtype):
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[-1],)),
        name=name,
    )


class StandIn(nn.Module):
    """features [B,N,D], voxels [B,N,3], point_mask [B,N], prompt_* [B,Lp], answer_* [B,La]
    -> logits [B,La,V]; V = vocab + loc_bins, the location rows a separate parameter."""

    vocab: int = 32
    loc_bins: int = 8
    width: int = 32
    num_queries: int = 4
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
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
        w = self.width
        pos = nn.Embed(256, features.shape[-1], name="pos")(voxels).sum(-2)
        points = _dense(w, ("enc_embed", "embed"), "qformer_in", self.dtype)(features + 0.01 * pos)
        queries = self.param(
            "query_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("queries", "embed")),
            (self.num_queries, w),
        )
        q = _dense(w, ("embed", "heads"), "qformer_query", self.dtype)(queries)
        scores = jnp.einsum("qd,bnd->bqn", q, points) / jnp.sqrt(w)
        scores = jnp.where(point_mask[:, None, :], scores, -1e9)
        attended = jnp.einsum("bqn,bnd->bqd", nn.softmax(scores, axis=-1), points)
        attended = nn.LayerNorm(dtype=self.dtype, name="qformer_ln")(attended)
        attended = nn.Dropout(self.dropout)(attended, deterministic=deterministic)
        prefix = _dense(w, ("mlp", "embed"), "projection", self.dtype)(attended)

        base = self.param(
            "llm_embed",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.vocab, w),
        )
        loc = self.param(
            "llm_loc_embed",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.loc_bins, w),
        )
        table = jnp.concatenate([base, loc], axis=0)
        prompt = table[prompt_ids] * prompt_mask[..., None]
        context = jnp.concatenate([prefix, prompt], axis=1).mean(axis=1, keepdims=True)
        shifted = jnp.pad(answer_ids, ((0, 0), (1, 0)))[:, :-1]
        h = table[shifted] + context
        h = nn.gelu(_dense(2 * w, ("embed", "mlp"), "llm_mlp_in", self.dtype)(h))
        h = _dense(w, ("mlp", "embed"), "llm_mlp_out", self.dtype)(h)
        return jnp.einsum("bld,vd->blv", h.astype(jnp.float32), table)


def build(mesh, *, batch_size=8, microbatches=1, total_steps=10, lr=1e-2, dropout=0.0, seed=0):
    """Stand-in model, synthetic data, optimizer and a sharded fresh state on `mesh`.

    -> dict with module, data, tx, schedule, state, frozen, state_sh, frozen_sh, train_step (jitted).
    """
    import jax

    from llm3d_jax.train import optimizer, sharding, synthetic
    from llm3d_jax.train import state as state_lib
    from llm3d_jax.train import step as step_lib

    module = StandIn(dropout=dropout)
    data = synthetic.SyntheticBatches(
        batch_size=batch_size,
        num_points=16,
        feature_dim=12,
        prompt_len=5,
        answer_len=4,
        vocab_size=32,
        answer_offset=32,
        seed=seed,
        sharding=sharding.batch_sharding(mesh),
    )
    example = {k: v[:1] for k, v in data.host_batch(0).items()}
    init_fn = lambda rng: module.init(rng, **example, deterministic=True)["params"]
    boxed = state_lib.abstract_params(init_fn)
    trainable_abs, _, trainable_sh, frozen_sh = state_lib.param_shardings(boxed, mesh, TRAINABLE)
    schedule = optimizer.make_schedule(
        lr=lr, min_lr=lr / 10, warmup_steps=2, total_steps=total_steps
    )
    tx = optimizer.make_optimizer(
        trainable_abs, schedule, b1=0.9, b2=0.999, weight_decay=0.05, grad_clip=1.0
    )
    state_sh = state_lib.state_shardings(tx, trainable_abs, trainable_sh, mesh)
    with jax.set_mesh(mesh):
        state, frozen = state_lib.init_random(
            init_fn, tx, TRAINABLE, state_sh, frozen_sh, jax.random.key(seed)
        )
    train_step = jax.jit(
        step_lib.make_train_step(module, tx, schedule, microbatches),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return dict(
        module=module,
        data=data,
        tx=tx,
        trainable_abs=trainable_abs,
        state=state,
        frozen=frozen,
        state_sh=state_sh,
        frozen_sh=frozen_sh,
        train_step=train_step,
        mesh=mesh,
    )


def run_steps(built, num_steps, rng_seed=1):
    """Trains `num_steps`; -> (final state, list of float losses)."""
    import jax

    state, losses = built["state"], []
    with jax.set_mesh(built["mesh"]):
        for _ in range(num_steps):
            state, metrics = built["train_step"](
                state, built["frozen"], next(built["data"]), jax.random.key(rng_seed)
            )
            losses.append(float(metrics["loss"]))
    return state, losses
