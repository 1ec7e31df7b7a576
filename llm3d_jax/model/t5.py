"""T5 v1.0 and v1.1 / FlanT5 encoder-decoder (HF `T5ForConditionalGeneration` numerics).

- T5 LayerNorm: RMS norm, scale only, statistics in float32.
- Attention: no 1/sqrt(d) scaling (folded into the init), relative position bias computed by the
  first layer of each stack and shared by all its layers (bidirectional buckets in the encoder,
  causal in the decoder), no bias on cross-attention. No biases anywhere.
- FFN: `relu` (v1.0) or gated `gelu_new` (tanh approximation, v1.1 / FlanT5).
- Head: tied to `shared` (v1.0; the decoder output is rescaled by d_model**-0.5 first) or an untied
  `lm_head` (v1.1 / FlanT5).
- Location tokens (docs/architecture.md "Location tokens in the model"): with `loc_bins > 0` the
  effective embedding table is `concat(shared[:loc_offset], loc_embed)` and the logits are
  `concat(base_logits[..., :loc_offset], loc_logits)`, so token id == logits column; `loc_embed`
  (and `loc_head` when untied) are separate parameters that can train while `shared` stays frozen.

Decoding: `init_cache` + `decode_step` keep an explicit cache pytree in which every array has the
batch on axis 0 (beam search can reorder it with `jnp.take(..., axis=0)`).

`scan_layers=True` stacks each stack's block parameters on a leading `layers` axis (`block`
instead of `block_0` .. `block_{n-1}`; `llm3d_jax.convert.t5.stack_blocks` converts) and runs them
with `nn.scan`: one compiled block body per stack, so deep models compile in a fraction of the
time. The decoding cache then holds stacked arrays [B, layers, ...] instead of one dict per layer.
`remat=True` recomputes each block's activations in the backward pass (with or without scan).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm3d_jax.model import attention, location_rows

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu_new": partial(jax.nn.gelu, approximate=True),  # HF "gelu_new": tanh approximation
    "gelu": partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    activation: str = "relu"  # a key of ACTIVATIONS
    gated: bool = False  # v1.1 / FlanT5: act(wi_0 x) * wi_1 x
    tie_word_embeddings: bool = True  # head = shared.T (v1.0) vs a separate lm_head (v1.1)
    scale_decoder_outputs: bool = True  # multiply by d_model**-0.5 before the head (tied v1.0)
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    loc_offset: int = 0  # id of <loc0>; = vocab_size when no tokenizer says otherwise
    loc_bins: int = 0  # number of location tokens; 0: a plain T5
    # >0: location rows are learnt projections of the position embedding's sin/cos table of
    # this width (location_rows.rows_from_table); 0: free rows
    loc_table_dim: int = 0
    dtype: str = "float32"  # compute dtype; params are always float32
    remat: bool = False  # rematerialise each block in the backward pass
    scan_layers: bool = False  # stack blocks on a leading axis and run them with nn.scan
    attention_impl: str | None = None  # None / "xla" | "cudnn" (llm3d_jax.model.attention)

    def __post_init__(self):
        attention.check_implementation(self.attention_impl)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown T5 activation {self.activation!r}")
        location_rows.check_config(self.loc_offset, self.loc_bins, self.vocab_size)

    @property
    def num_logits(self) -> int:
        """Width of the logits (and the id space): base tokens then location tokens."""
        return location_rows.num_logits(self.vocab_size, self.loc_offset, self.loc_bins)

    @property
    def token_dim(self) -> int:
        """Width of the token embeddings (and of `inputs_embeds`)."""
        return self.d_model

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def forward_flops(self, prefix_len: int, answer_len: int) -> int:
        """Matmul FLOPs of one example's forward pass: the encoder over the prefix, the decoder
        over the answer (the LLM interface's FLOP count, for MFU)."""
        inner = self.num_heads * self.d_kv
        ffn_mats = 3 if self.gated else 2
        enc, dec, d = prefix_len, answer_len, self.d_model
        enc_layer = (
            2 * enc * 4 * d * inner
            + attention.flops(enc, enc, inner)
            + 2 * enc * ffn_mats * d * self.d_ff
        )
        dec_layer = (
            2 * dec * 4 * d * inner  # self attention q k v o
            + attention.flops(dec, dec, inner)
            + 2 * dec * 2 * d * inner  # cross attention q o
            + 2 * enc * 2 * d * inner  # cross attention k v (over the encoder output)
            + attention.flops(dec, enc, inner)
            + 2 * dec * ffn_mats * d * self.d_ff
        )
        lm_head = 2 * dec * d * self.num_logits
        return self.num_layers * enc_layer + self.num_decoder_layers * dec_layer + lm_head

    @classmethod
    def tiny(cls, **overrides) -> T5Config:
        """A FlanT5-shaped model small enough for unit tests and the CPU demo."""
        base = dict(
            vocab_size=128,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.1,
            activation="gelu_new",
            gated=True,
            tie_word_embeddings=False,
            scale_decoder_outputs=False,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def flan_t5_xl(cls, **overrides) -> T5Config:
        """google/flan-t5-xl shapes (the LLM of the released 3D-LLM)."""
        base = dict(
            vocab_size=32128,
            d_model=2048,
            d_kv=64,
            d_ff=5120,
            num_layers=24,
            num_decoder_layers=24,
            num_heads=32,
            activation="gelu_new",
            gated=True,
            tie_word_embeddings=False,
            scale_decoder_outputs=False,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf(cls, config: dict, **overrides) -> T5Config:
        """From a HF T5 config.json dict (v1.0 `relu`, v1.1/FlanT5 `gated-gelu`)."""
        proj = config.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"unsupported feed_forward_proj {proj!r}")
        activation = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unsupported T5 activation {activation!r} (feed_forward_proj {proj!r})"
            )
        tie = bool(config.get("tie_word_embeddings", True))
        num_layers = int(config.get("num_layers", 6))
        kwargs = dict(
            vocab_size=int(config.get("vocab_size", 32128)),
            d_model=int(config.get("d_model", 512)),
            d_kv=int(config.get("d_kv", 64)),
            d_ff=int(config.get("d_ff", 2048)),
            num_layers=num_layers,
            num_decoder_layers=int(config.get("num_decoder_layers") or num_layers),
            num_heads=int(config.get("num_heads", 8)),
            relative_attention_num_buckets=int(config.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(config.get("relative_attention_max_distance", 128)),
            dropout_rate=float(config.get("dropout_rate", 0.1)),
            layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-6)),
            activation=activation,
            gated=len(parts) == 2,
            tie_word_embeddings=tie,
            # transformers >= 5 writes this flag; older configs imply it from the tying.
            scale_decoder_outputs=bool(config.get("scale_decoder_outputs", tie)),
            decoder_start_token_id=int(config.get("decoder_start_token_id") or 0),
            pad_token_id=int(config.get("pad_token_id") or 0),
            eos_token_id=int(config.get("eos_token_id") or 1),
            loc_offset=int(config.get("vocab_size", 32128)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def _param_init(std: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def relative_position_buckets(
    relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """int32 buckets of `key_pos - query_pos` exactly as HF/Mesh-TF (float32 log, truncation).

    Computed with numpy at trace time: positions are static, and this keeps the buckets at the
    float32 boundaries identical to the PyTorch reference (checked against a golden table).
    """
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(rel.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class T5LayerNorm(nn.Module):
    """RMS norm with a scale and no bias. [..., d] -> [..., d] in the compute dtype."""

    epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],)
        )
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(variance + self.epsilon)).astype(self.dtype)
        return scale.astype(self.dtype) * y


class T5Attention(nn.Module):
    """Multi-head attention without scaling or biases (the position bias is an input).

    key_value: [B,Lk,d] -> k, v [B,Lk,H,dk];  __call__: x [B,Lq,d], k, v, bias [B|1,H,Lq,Lk] or
    None, mask bool [B,1|H,Lq,Lk] -> [B,Lq,d].
    """

    config: T5Config

    def setup(self):
        c = self.config
        inner = c.num_heads * c.d_kv
        dense = partial(nn.Dense, use_bias=False, dtype=c.compute_dtype, param_dtype=jnp.float32)
        self.q = dense(
            inner, kernel_init=_param_init((c.d_model * c.d_kv) ** -0.5, ("embed", "heads"))
        )
        self.k = dense(inner, kernel_init=_param_init(c.d_model**-0.5, ("embed", "heads")))
        self.v = dense(inner, kernel_init=_param_init(c.d_model**-0.5, ("embed", "heads")))
        self.o = dense(c.d_model, kernel_init=_param_init(inner**-0.5, ("heads", "embed")))
        self.dropout = nn.Dropout(c.dropout_rate)

    def _split(self, x):
        """[B,L,H*dk] (split over the heads) -> [B,L,H,dk]."""
        x = nn.with_logical_constraint(x, ("batch", "length", "heads"))
        return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv)

    def key_value(self, x):
        """x [B,Lk,d] -> k, v [B,Lk,H,dk]."""
        return self._split(self.k(x)), self._split(self.v(x))

    def __call__(self, x, k, v, bias, mask, deterministic: bool):
        c = self.config
        q = self._split(self.q(x))  # [B,Lq,H,dk]
        training = not deterministic and c.dropout_rate > 0
        out = attention.dot_product_attention(
            q,
            k,
            v,
            bias=bias,
            mask=mask,
            scale=1.0,  # T5 folds 1/sqrt(dk) into the init of q
            dropout=partial(self.dropout, deterministic=False) if training else None,
            implementation=c.attention_impl,
        )  # [B,Lq,H,dk]
        out = out.reshape(*out.shape[:2], -1)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads"))  # [B,Lq,H*dk]
        return self.o(out)


class T5MLP(nn.Module):
    """[B,L,d] -> [B,L,d]: wo(act(wi x)) or wo(act(wi_0 x) * wi_1 x)."""

    config: T5Config

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.config
        dense = partial(nn.Dense, use_bias=False, dtype=c.compute_dtype, param_dtype=jnp.float32)
        act = ACTIVATIONS[c.activation]
        wi_init = _param_init(c.d_model**-0.5, ("embed", "mlp"))
        if c.gated:
            h = act(dense(c.d_ff, kernel_init=wi_init, name="wi_0")(x))
            h = h * dense(c.d_ff, kernel_init=wi_init, name="wi_1")(x)
        else:
            h = act(dense(c.d_ff, kernel_init=wi_init, name="wi")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))  # [B,L,d_ff]
        h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
        return dense(c.d_model, kernel_init=_param_init(c.d_ff**-0.5, ("mlp", "embed")), name="wo")(
            h
        )


class T5Block(nn.Module):
    """One encoder block (self-attn, FFN) or decoder block (self-attn, cross-attn, FFN).

    __call__(x [B,L,d], layer, ctx, deterministic) -> (x [B,L,d], per-block output or None).
    The signature is the same with and without nn.scan (then `layer` is a traced scalar). `ctx`
    is shared by every block of the stack and says what to do:
    - full sequence: bias [1,H,L,L], mask bool [B,1,L,L]; decoder blocks also encoded [B,Le,d]
      and encoder_mask bool [B,1,1,Le]. Output None.
    - one decoding position of a scanned stack: the `step` ctx plus `cache` (k, v
      [B,layers,Lmax,H,dk], cross_k, cross_v [B,layers,Le,H,dk]), of which `layer` picks this
      block's slice. Output as `step`.
    - `cross_kv_of` [B,Le,d] (a scanned stack's `init_cache`): x passes through, output the
      cross-attention k, v [B,Le,H,dk].
    """

    config: T5Config
    is_decoder: bool

    def setup(self):
        c = self.config
        norm = partial(T5LayerNorm, c.layer_norm_epsilon, c.compute_dtype)
        self.self_attn_norm = norm()
        self.self_attn = T5Attention(c)
        if self.is_decoder:
            self.cross_attn_norm = norm()
            self.cross_attn = T5Attention(c)
        self.mlp_norm = norm()
        self.mlp = T5MLP(c)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x, layer, ctx: dict, deterministic: bool):
        if "cache" in ctx:
            take = partial(jax.lax.dynamic_index_in_dim, index=layer, axis=1, keepdims=False)
            return self.step(x, jax.tree.map(take, ctx["cache"]), ctx)
        if "cross_kv_of" in ctx:
            return x, self.cross_key_value(ctx["cross_kv_of"])
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))  # [B,L,d]
        h = self.self_attn_norm(x)
        k, v = self.self_attn.key_value(h)
        attended = self.self_attn(h, k, v, ctx["bias"], ctx["mask"], deterministic)
        x = x + self.dropout(attended, deterministic)
        if self.is_decoder:
            ck, cv = self.cross_attn.key_value(ctx["encoded"])
            x = x + self._cross(x, ck, cv, ctx["encoder_mask"], deterministic)
        x = x + self._mlp(x, deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None

    def _cross(self, x, ck, cv, encoder_mask, deterministic):
        h = self.cross_attn_norm(x)
        return self.dropout(
            self.cross_attn(h, ck, cv, None, encoder_mask, deterministic), deterministic
        )

    def _mlp(self, x, deterministic):
        return self.dropout(self.mlp(self.mlp_norm(x), deterministic), deterministic)

    def cross_key_value(self, encoded):
        """encoded [B,Le,d] -> cross-attention k, v [B,Le,H,dk] (computed once per generation)."""
        return self.cross_attn.key_value(encoded)

    def step(self, x, layer_cache, ctx):
        """One decoding position. x [B,1,d]; layer_cache: this block's k, v [B,Lmax,H,dk] and
        cross_k, cross_v [B,Le,H,dk]; ctx: bias [B,H,1,Lmax], mask bool [B,1,1,Lmax], write bool
        [B,Lmax] (the slot of this position), encoder_mask bool [B,1,1,Le]
        -> (x [B,1,d], (k, v) [B,1,H,dk] of this position, for the caller to write)."""
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = self.self_attn_norm(x)
        k_new, v_new = self.self_attn.key_value(h)
        slot = ctx["write"][:, :, None, None]
        k = jnp.where(slot, k_new.astype(layer_cache["k"].dtype), layer_cache["k"])
        v = jnp.where(slot, v_new.astype(layer_cache["v"].dtype), layer_cache["v"])
        x = x + self.self_attn(h, k, v, ctx["bias"], ctx["mask"], True)
        x = x + self._cross(
            x, layer_cache["cross_k"], layer_cache["cross_v"], ctx["encoder_mask"], True
        )
        x = nn.with_logical_constraint(x + self._mlp(x, True), ("batch", "length", "embed"))
        return x, (k_new, v_new)


class T5Stack(nn.Module):
    """Encoder (bidirectional) or decoder (causal, cross-attending) stack on embeddings.

    __call__: x [B,L,d], mask [B,L], encoded [B,Le,d] | None, encoder_mask [B,Le] | None
    -> [B,L,d] after the final norm.
    """

    config: T5Config
    is_decoder: bool

    @property
    def num_blocks(self) -> int:
        c = self.config
        return c.num_decoder_layers if self.is_decoder else c.num_layers

    def setup(self):
        c = self.config
        self.relpos_bias = self.param(
            "relpos_bias",
            _param_init(c.d_model**-0.5, ("relpos", None)),
            (c.relative_attention_num_buckets, c.num_heads),
        )
        # deterministic (argument 4, counting self) selects dropout: static under remat.
        block = nn.remat(T5Block, static_argnums=(4,)) if c.remat else T5Block
        if c.scan_layers:
            self.block = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=self.num_blocks,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.is_decoder)
        else:
            self.block = [block(c, self.is_decoder) for _ in range(self.num_blocks)]
        self.final_norm = T5LayerNorm(c.layer_norm_epsilon, c.compute_dtype)
        self.dropout = nn.Dropout(c.dropout_rate)

    def _bias(self, buckets):
        """buckets int [..., Lq, Lk] -> bias [..., H, Lq, Lk] in float32."""
        return jnp.moveaxis(jnp.take(self.relpos_bias, buckets, axis=0), -1, -3)

    def _buckets(self, relative_position):
        c = self.config
        return relative_position_buckets(
            relative_position,
            bidirectional=not self.is_decoder,
            num_buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance,
        )

    def _scanned(self, x, ctx, deterministic: bool):
        """All blocks through nn.scan -> (x, per-block outputs stacked on axis 1, [B,layers,...])."""
        x, out = self.block(x, jnp.arange(self.num_blocks), ctx, deterministic)
        return x, jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), out)

    def __call__(self, x, mask, encoded, encoder_mask, deterministic: bool):
        length = x.shape[1]
        positions = np.arange(length)
        bias = self._bias(self._buckets(positions[None, :] - positions[:, None]))[None]
        mask = mask.astype(bool)
        ctx = dict(bias=bias, mask=mask[:, None, None, :])
        if self.is_decoder:
            ctx["mask"] = ctx["mask"] & jnp.tril(jnp.ones((length, length), bool))[None, None]
            ctx.update(encoded=encoded, encoder_mask=encoder_mask.astype(bool)[:, None, None, :])
        x = self.dropout(x, deterministic)
        if self.config.scan_layers:
            x, _ = self._scanned(x, ctx, deterministic)
        else:
            for i, block in enumerate(self.block):
                x, _ = block(x, i, ctx, deterministic)
        return self.dropout(self.final_norm(x), deterministic)

    def init_cache(self, encoded, encoder_mask, max_decode_len: int) -> dict:
        c = self.config
        batch = encoded.shape[0]
        cache = dict(index=jnp.zeros((batch,), jnp.int32), encoder_mask=encoder_mask.astype(bool))
        if c.scan_layers:
            _, (ck, cv) = self._scanned(encoded, dict(cross_kv_of=encoded), True)
            shape = (batch, self.num_blocks, max_decode_len, c.num_heads, c.d_kv)
            empty = jnp.zeros(shape, c.compute_dtype)
            return dict(cache, k=empty, v=empty, cross_k=ck, cross_v=cv)
        layers = []
        for block in self.block:
            ck, cv = block.cross_key_value(encoded)
            empty = jnp.zeros((batch, max_decode_len, c.num_heads, c.d_kv), c.compute_dtype)
            layers.append(dict(k=empty, v=empty, cross_k=ck, cross_v=cv))
        return dict(cache, layers=tuple(layers))

    def step(self, x, cache):
        """x [B,1,d] embedded token at position cache['index'] -> ([B,1,d], new cache)."""
        scanned = self.config.scan_layers
        max_len = (cache["k"] if scanned else cache["layers"][0]["k"]).shape[-3]
        index = cache["index"]
        keys = jnp.arange(max_len)
        # Bucket table over every possible key - query offset; indexed with the traced position.
        offsets = np.arange(-(max_len - 1), max_len)
        table = jnp.asarray(self._buckets(offsets))
        buckets = table[keys[None, :] - index[:, None] + max_len - 1]  # [B, Lmax]
        ctx = dict(
            bias=self._bias(buckets[:, None, :]),  # [B, H, 1, Lmax]
            mask=(keys[None, :] <= index[:, None])[:, None, None, :],
            write=keys[None, :] == index[:, None],
            encoder_mask=cache["encoder_mask"][:, None, None, :],
        )
        rows = jnp.arange(index.shape[0])
        if scanned:
            stacked = {n: cache[n] for n in ("k", "v", "cross_k", "cross_v")}
            x, (k_new, v_new) = self._scanned(x, dict(ctx, cache=stacked), True)
            # k_new [B, layers, 1, H, dk] -> slot `index` of each row, every layer (a scatter).
            new = {
                n: cache[n].at[rows, :, index].set(a[:, :, 0].astype(cache[n].dtype))
                for n, a in (("k", k_new), ("v", v_new))
            }
        else:
            layers = []
            for block, layer_cache in zip(self.block, cache["layers"]):
                x, (k_new, v_new) = block.step(x, layer_cache, ctx)
                written = {
                    n: layer_cache[n].at[rows, index].set(a[:, 0].astype(layer_cache[n].dtype))
                    for n, a in (("k", k_new), ("v", v_new))
                }
                layers.append(dict(layer_cache, **written))
            new = dict(layers=tuple(layers))
        x = self.final_norm(x)
        return x, dict(cache, index=index + 1, **new)


class T5(nn.Module):
    """T5 encoder-decoder with optional location-token rows.

    __call__(input_ids | inputs_embeds [B,Le(,d)], attention_mask [B,Le], decoder_input_ids
    [B,Ld], decoder_attention_mask [B,Ld]) -> logits float32 [B,Ld,num_logits].
    """

    config: T5Config

    def setup(self):
        c = self.config
        self.shared = self.param(
            "shared", _param_init(1.0, ("vocab", "embed")), (c.vocab_size, c.d_model)
        )
        if c.loc_bins:
            # Small tables: replicated (None) rather than split over the vocab axis.
            rows = c.loc_table_dim or c.loc_bins
            # table rows: entries ~1, so scale the projection to give unit-variance embeddings
            std = (2.0 / c.loc_table_dim) ** 0.5 if c.loc_table_dim else 1.0
            self.loc_embed = self.param(
                "loc_embed", _param_init(std, (None, "embed")), (rows, c.d_model)
            )
        if not c.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head",
                _param_init(c.d_model**-0.5, ("embed", "vocab")),
                (c.d_model, c.vocab_size),
            )
            if c.loc_bins:
                self.loc_head = self.param(
                    "loc_head",
                    _param_init(c.d_model**-0.5, ("embed", None)),
                    (c.d_model, c.loc_table_dim or c.loc_bins),
                )
        self.encoder = T5Stack(c, is_decoder=False)
        self.decoder = T5Stack(c, is_decoder=True)

    def embed(self, ids):
        """ids int [B,L] (base ids below loc_offset, location ids after) -> [B,L,d]."""
        c = self.config
        loc_table = None
        if c.loc_bins:
            loc_table, _ = location_rows.rows_from_table(
                self.loc_embed, None, c.loc_bins, c.loc_table_dim
            )
        return location_rows.embed(
            ids, self.shared, loc_table, c.loc_offset, c.loc_bins, c.compute_dtype
        )

    def logits(self, h):
        """Decoder output [..., d] -> float32 logits [..., num_logits]."""
        c = self.config
        if c.scale_decoder_outputs:
            h = h * (c.d_model**-0.5)
        tied = c.tie_word_embeddings
        head = self.shared if tied else self.lm_head
        loc_head = None
        if c.loc_bins:
            rows, head_rows = location_rows.rows_from_table(
                self.loc_embed, None if tied else self.loc_head, c.loc_bins, c.loc_table_dim
            )
            loc_head = rows if tied else head_rows
        logits = location_rows.logits(
            h, head, loc_head, tied, c.loc_offset, c.loc_bins, c.compute_dtype
        )
        # [B,L,V], or [B,V] at one decoding position
        names = ("batch", "length", "vocab") if logits.ndim == 3 else ("batch", "vocab")
        return nn.with_logical_constraint(logits, names)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, deterministic=True):
        """-> encoder output [B,Le,d]."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        x = x.astype(self.config.compute_dtype)
        if attention_mask is None:
            attention_mask = jnp.ones(x.shape[:2], bool)
        return self.encoder(x, attention_mask, None, None, deterministic)

    def decode(
        self,
        encoded,
        encoder_mask,
        decoder_input_ids,
        decoder_attention_mask=None,
        deterministic=True,
    ):
        """Teacher-forced decoder: -> logits [B,Ld,num_logits]."""
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones(decoder_input_ids.shape, bool)
        x = self.embed(decoder_input_ids)
        h = self.decoder(x, decoder_attention_mask, encoded, encoder_mask, deterministic)
        return self.logits(h)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        inputs_embeds=None,
        deterministic: bool = True,
    ):
        encoded = self.encode(input_ids, attention_mask, inputs_embeds, deterministic)
        if attention_mask is None:
            attention_mask = jnp.ones(encoded.shape[:2], bool)
        return self.decode(
            encoded, attention_mask, decoder_input_ids, decoder_attention_mask, deterministic
        )

    # -- the LLM interface the 3D-LLM drives (model/decoder.py's Decoder has the same four) ------
    # embed(ids); answer_logits(prefix, mask, answer_ids, answer_mask); prefill_embeds(prefix,
    # mask, max_decode_len) -> (cache, first logits); decode_step(cache, ids). T5 encodes the
    # prefix and decodes the answer from the decoder start token.

    def answer_logits(
        self, prefix_embeds, prefix_mask, answer_ids, answer_mask, deterministic: bool = True
    ):
        """prefix_embeds [B,P,d_model] (the 3D-LLM's scene tokens and prompt), prefix_mask [B,P],
        answer_ids / answer_mask [B,La] -> teacher-forced logits [B,La,num_logits], `logits[:, t]`
        scoring `answer_ids[:, t]`."""
        encoded = self.encode(
            inputs_embeds=prefix_embeds, attention_mask=prefix_mask, deterministic=deterministic
        )
        decoder_input_ids = shift_right(answer_ids, self.config.decoder_start_token_id)
        return self.decode(encoded, prefix_mask, decoder_input_ids, answer_mask, deterministic)

    def prefill_embeds(self, prefix_embeds, prefix_mask, max_decode_len: int):
        """Encodes the prefix once -> (cache with room for `max_decode_len` answer tokens, logits
        [B,num_logits] of the first answer token)."""
        encoded = self.encode(inputs_embeds=prefix_embeds, attention_mask=prefix_mask)
        cache = self.init_cache(encoded, prefix_mask, max_decode_len)
        start = jnp.full((encoded.shape[0],), self.config.decoder_start_token_id, jnp.int32)
        logits, cache = self.decode_step(cache, start)
        return cache, logits

    def init_cache(self, encoded, encoder_mask, max_decode_len: int) -> dict:
        """Decoding cache: index [B], encoder_mask [B,Le] and the decoder blocks' self-attention
        k/v [B,Lmax,H,dk] and cross-attention k/v [B,Le,H,dk]: `layers`, a tuple of one dict
        (k, v, cross_k, cross_v) per block, or with `scan_layers` the stacked arrays k, v
        [B,layers,Lmax,H,dk] and cross_k, cross_v [B,layers,Le,H,dk]."""
        return self.decoder.init_cache(encoded, encoder_mask, max_decode_len)

    def decode_step(self, cache, token_ids):
        """token_ids int [B] at position cache['index'] -> (logits [B,num_logits], new cache)."""
        x = self.embed(token_ids[:, None])
        h, cache = self.decoder.step(x, cache)
        return self.logits(h[:, 0]), cache


def shift_right(ids, start_token_id: int = 0):
    """Decoder inputs for teacher forcing: [start, ids[:, :-1]] ([B,L] -> [B,L])."""
    ids = jnp.asarray(ids, jnp.int32)
    start = jnp.full((ids.shape[0], 1), start_token_id, jnp.int32)
    return jnp.concatenate([start, ids[:, :-1]], axis=1)


def abstract_params(module: nn.Module, **inputs) -> dict:
    """ShapeDtypeStruct tree of `module`'s params (no memory, no compute)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))
    return nn.unbox(shapes)["params"]


def init_params(module: T5, seed: int = 0) -> dict:
    """Random float32 params (unboxed), initialised inside `jax.jit`."""
    ids = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda rng: nn.unbox(module.init(rng, input_ids=ids, decoder_input_ids=ids)))
    return init(jax.random.key(seed))["params"]


def init_location_rows(base: np.ndarray, bins: int, seed: int = 0) -> np.ndarray:
    """New rows [bins, d] for location tokens: the mean of `base` rows [V, d] plus a little
    per-dimension noise (10% of the rows' std), so the new tokens start in-distribution and
    distinct from each other."""
    base = np.asarray(base, np.float32)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((bins, base.shape[1])).astype(np.float32)
    return base.mean(0) + 0.1 * base.std(0) * noise
