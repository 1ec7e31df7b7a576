"""BLIP-2 Q-Former (query path only) and a BERT text encoder built from the same layer code.

The Q-Former turns a variable set of point features into a fixed number of query vectors:
learned `query_tokens` [1,Q,H] -> LayerNorm -> layers, where layer i runs
  self-attention over the queries -> cross-attention to the point features (when
  i % cross_attention_frequency == 0) -> the query feed-forward,
each block post-LN as in BERT (`LayerNorm(x + dropout(block(x)))`) with exact (erf) GELU, as in
BLIP-2 / LAVIS / transformers' `Blip2QFormerModel`. The text branch of BLIP-2 is not needed.

`BertEncoder` is a plain BERT (embeddings + the same layers without cross-attention); it reads
HF `BertModel` checkpoints (e.g. MiniLM) and is what a Q-Former initialised from BERT starts from.

Parameters are float32 with logical axis names (docs/architecture.md); `config.dtype` is the
compute dtype (float32 or bfloat16, softmax always in float32); dropout runs when
`deterministic=False` and a `"dropout"` rng is given.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm3d_jax.model import attention


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    # Each query starts as its learned token plus a projection of one seed point's state (the
    # caller picks the seeds: `llm3d.spread_seeds`), so the queries begin as distinct
    # local slots of the scene. False: learned tokens only, as BLIP-2.
    seeded_queries: bool = False
    dtype: str = "float32"
    attention_impl: str | None = None  # None / "xla" | "cudnn" (llm3d_jax.model.attention)

    def __post_init__(self):
        attention.check_implementation(self.attention_impl)

    @classmethod
    def tiny(cls, **overrides) -> QFormerConfig:
        base = cls(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            encoder_hidden_size=24,
            num_query_tokens=8,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_hf(cls, config: dict, **overrides) -> QFormerConfig:
        """From a HF config.json dict: a BLIP-2 one (its `qformer_config`) or a BERT one.

        A BERT config gives the layer shapes; the BLIP-2 additions (cross-attention frequency,
        encoder width, query count) keep their defaults unless given in `overrides`.
        """
        if "qformer_config" in config:
            q = config["qformer_config"] or {}
            fields = {
                "num_query_tokens": config.get("num_query_tokens", cls.num_query_tokens),
                "cross_attention_frequency": q.get(
                    "cross_attention_frequency", cls.cross_attention_frequency
                ),
                "encoder_hidden_size": q.get("encoder_hidden_size", cls.encoder_hidden_size),
            }
        else:
            q, fields = config, {}
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "layer_norm_eps",
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "initializer_range",
        ):
            if name in q:
                fields[name] = q[name]
        return dataclasses.replace(cls(**fields), **overrides)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    dtype: str = "float32"
    attention_impl: str | None = None  # None / "xla" | "cudnn" (llm3d_jax.model.attention)

    def __post_init__(self):
        attention.check_implementation(self.attention_impl)

    @classmethod
    def tiny(cls, **overrides) -> BertConfig:
        base = cls(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_hf(cls, config: dict, **overrides) -> BertConfig:
        names = [
            f.name for f in dataclasses.fields(cls) if f.name not in ("dtype", "attention_impl")
        ]
        return dataclasses.replace(cls(**{n: config[n] for n in names if n in config}), **overrides)


# ---------------------------------------------------------------------------------------------
# Layers shared by the Q-Former and BERT (config: either config class; same field names).


def bert_dense(features: int, names: tuple, config: Any, name: str) -> nn.Dense:
    """A BERT-style dense layer of `config` (its dtype and init range), kernel axes `names`
    (the Q-Former's, and model/llm3d.py's point relevance layers)."""
    return nn.Dense(
        features,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(config.initializer_range), names
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]),
        name=name,
    )


def bert_layer_norm(config: Any, name: str) -> nn.LayerNorm:
    """A BERT-style LayerNorm of `config` (its epsilon and dtype)."""
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class BertAttention(nn.Module):
    """Post-LN attention block: x [B,L,H], kv [B,S,K], kv_mask [B,S] (1 = attend) -> [B,L,H].

    Self-attention when kv is x (K = H); cross-attention to the point features when kv is the
    encoder states (K = encoder width, logical axis `enc_embed`).
    """

    config: Any
    kv_axis: str = "embed"

    @nn.compact
    def __call__(self, x, kv, kv_mask=None, deterministic: bool = True):
        cfg = self.config
        heads, width = cfg.num_attention_heads, cfg.hidden_size
        head_dim = width // heads
        # [B,L|S,N*hd], split over the heads
        q = bert_dense(width, ("embed", "heads"), cfg, "query")(x)
        k = bert_dense(width, (self.kv_axis, "heads"), cfg, "key")(kv)
        v = bert_dense(width, (self.kv_axis, "heads"), cfg, "value")(kv)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads"))
        k = nn.with_logical_constraint(k, ("batch", "length", "heads"))
        v = nn.with_logical_constraint(v, ("batch", "length", "heads"))
        q = q.reshape(*q.shape[:2], heads, head_dim)  # [B,L,N,hd]
        k = k.reshape(*k.shape[:2], heads, head_dim)  # [B,S,N,hd]
        v = v.reshape(*v.shape[:2], heads, head_dim)
        mask = None if kv_mask is None else kv_mask[:, None, None, :].astype(bool)  # [B,1,1,S]
        probs_dropout = nn.Dropout(cfg.attention_probs_dropout_prob)
        training = not deterministic and cfg.attention_probs_dropout_prob > 0
        context = attention.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            dropout=functools.partial(probs_dropout, deterministic=False) if training else None,
            implementation=cfg.attention_impl,
        )  # [B,L,N,hd]
        context = context.reshape(*context.shape[:2], width)
        context = nn.with_logical_constraint(context, ("batch", "length", "heads"))  # [B,L,N*hd]
        out = bert_dense(width, ("heads", "embed"), cfg, "out")(context)
        out = nn.Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)
        return bert_layer_norm(cfg, "norm")(out + x)


class BertFeedForward(nn.Module):
    """Post-LN feed-forward block with exact GELU: [B,L,H] -> [B,L,H]."""

    config: Any

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        h = bert_dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "intermediate")(x)
        h = jax.nn.gelu(h, approximate=False)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))  # [B,L,F]
        h = bert_dense(cfg.hidden_size, ("mlp", "embed"), cfg, "output")(h)
        h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        return bert_layer_norm(cfg, "norm")(h + x)


class BertLayer(nn.Module):
    """Self-attention [-> cross-attention] -> feed-forward: [B,L,H] -> [B,L,H]."""

    config: Any
    has_cross_attention: bool = False

    @nn.compact
    def __call__(
        self, x, mask=None, encoder_hidden_states=None, encoder_mask=None, deterministic=True
    ):
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))  # [B,L,H]
        x = BertAttention(self.config, name="attention")(x, x, mask, deterministic)
        if self.has_cross_attention:
            cross = BertAttention(self.config, kv_axis="enc_embed", name="crossattention")
            x = cross(x, encoder_hidden_states, encoder_mask, deterministic)
        x = BertFeedForward(self.config, name="mlp")(x, deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


# ---------------------------------------------------------------------------------------------


class QFormer(nn.Module):
    """encoder_hidden_states [B,N,D], encoder_attention_mask [B,N] (1 = real point) -> [B,Q,H].

    With `seeded_queries`, query_seeds [B,Q,D] (the states of Q chosen points) are projected and
    added to the query tokens before the first LayerNorm.
    """

    config: QFormerConfig

    @nn.compact
    def __call__(
        self,
        encoder_hidden_states,
        encoder_attention_mask=None,
        deterministic=True,
        query_seeds=None,
    ):
        cfg = self.config
        if cfg.seeded_queries != (query_seeds is not None):
            raise ValueError(
                f"seeded_queries={cfg.seeded_queries} but query_seeds "
                f"{'given' if query_seeds is not None else 'missing'}"
            )
        dtype = jnp.dtype(cfg.dtype)
        query_tokens = self.param(
            "query_tokens",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), (None, "queries", "embed")
            ),
            (1, cfg.num_query_tokens, cfg.hidden_size),
            jnp.float32,
        )
        batch = encoder_hidden_states.shape[0]
        x = jnp.broadcast_to(query_tokens, (batch, *query_tokens.shape[1:])).astype(dtype)
        if cfg.seeded_queries:
            # [B,Q,D] -> [B,Q,H]
            x = x + bert_dense(cfg.hidden_size, ("enc_embed", "embed"), cfg, "seed_proj")(
                query_seeds.astype(dtype)
            )
        x = bert_layer_norm(cfg, "layernorm")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        encoder_hidden_states = nn.with_logical_constraint(
            encoder_hidden_states.astype(dtype), ("batch", "length", "enc_embed")
        )  # [B,N,D]
        for i in range(cfg.num_hidden_layers):
            layer = BertLayer(
                cfg, has_cross_attention=i % cfg.cross_attention_frequency == 0, name=f"layer_{i}"
            )
            x = layer(x, None, encoder_hidden_states, encoder_attention_mask, deterministic)
        return x


class BertEncoder(nn.Module):
    """input_ids int [B,L], attention_mask [B,L], token_type_ids [B,L] -> last hidden [B,L,H]."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)

        def embed(rows: int, names: tuple, name: str) -> nn.Embed:
            init = nn.initializers.normal(cfg.initializer_range)
            return nn.Embed(
                rows,
                cfg.hidden_size,
                dtype=dtype,
                param_dtype=jnp.float32,
                embedding_init=nn.with_logical_partitioning(init, names),
                name=name,
            )

        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
            + embed(cfg.max_position_embeddings, ("pos", "embed"), "position_embeddings")(positions)
            + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        )
        x = bert_layer_norm(cfg, "embeddings_norm")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        for i in range(cfg.num_hidden_layers):
            x = BertLayer(cfg, name=f"layer_{i}")(x, attention_mask, deterministic=deterministic)
        return x


# ---------------------------------------------------------------------------------------------
# Loading HF checkpoints.


@functools.partial(jax.jit, static_argnums=0)
def _init(module: nn.Module, rng: jax.Array) -> dict:
    if isinstance(module, QFormer):
        args = (jnp.zeros((1, 1, module.config.encoder_hidden_size), jnp.float32),)
    else:
        args = (jnp.zeros((1, 1), jnp.int32),)
    return nn.meta.unbox(module.init(rng, *args))["params"]


def init_params(module: QFormer | BertEncoder, seed: int = 0) -> dict:
    """Random float32 params (unboxed) of a `QFormer` or `BertEncoder` (jitted, cached per config)."""
    return _init(module, jax.random.key(seed))


def param_shapes(module: QFormer | BertEncoder) -> dict:
    """The params tree as `jax.ShapeDtypeStruct`s, nothing allocated."""
    return jax.eval_shape(lambda: init_params(module))
