"""Decoder-only LLMs: OPT and the Llama layout (Llama 1-3, Qwen2, Mistral), HF numerics.

Two families behind one module:
- `opt`: learned positions (table row = position + 2), LayerNorm with bias, pre-LN
  (`do_layer_norm_before`) or post-LN, ReLU FFN with biases, biases on q/k/v/out, a final
  LayerNorm (pre-LN only), `project_in`/`project_out` when `word_embed_proj_dim != hidden_size`.
- `llama`: RMSNorm, rotary embeddings (default, `linear` and Llama 3 `llama3` frequency scaling;
  HF's rotate-half layout), grouped-query attention, SwiGLU, optional q/k/v bias (Qwen2) and
  output bias, optional sliding window per layer (Mistral; Qwen2 `layer_types`).
Heads are tied to the input embedding or separate (`lm_head`).

Positions: by default `cumsum(attention_mask) - 1` (so right padding, left padding and the padding
in the middle of a 3D-LLM input [queries; prompt; answer] all give the real tokens consecutive
positions; HF's OPT does exactly this, HF's Llama gives the same for the real tokens of a
right-padded batch). The sliding window counts sequence slots, as HF does.

Masks: causal; with `prefix_causal=False` in the config and a `prefix_len` [B] at call time the
first `prefix_len` slots attend to each other bidirectionally (a prefix LM).

Location tokens (docs/architecture.md "Location tokens in the model"): with `loc_bins > 0` the
effective embedding table is `concat(embed_tokens[:loc_offset], loc_embed)` and the logits are
`concat(base_logits[..., :loc_offset], loc_logits)`, so a token id equals its logits column.

Decoding: `prefill` runs the prefix once and returns an explicit cache in which every array has
the batch on axis 0 (beam search reorders it with `jnp.take(..., axis=0)`):
`k`, `v` [B, layers, Lmax, kv_heads, head_dim], `key_mask` [B, Lmax] (slots holding a real
token), `index` [B] (next slot to write) and `position` [B] (position id of the next token).
`decode_step` appends one token per row.

`scan_layers=True` stacks the layer parameters on a leading `layers` axis and runs them with
`nn.scan` (one compiled layer body: faster compiles for deep models); `remat=True` recomputes each
layer's activations in the backward pass.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm3d_jax.model import attention, location_rows

FAMILIES = ("opt", "llama")
MODEL_TYPES = {"opt": "opt", "llama": "llama", "qwen2": "llama", "mistral": "llama"}
ROPE_TYPES = ("default", "linear", "llama3")

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    family: str = "llama"  # "opt" | "llama" (Llama, Qwen2, Mistral)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    embed_dim: int = 0  # OPT word_embed_proj_dim (token embedding width); 0: hidden_size
    max_position_embeddings: int = 2048  # OPT: learned table has this + 2 rows
    activation: str = "silu"  # a key of ACTIVATIONS
    norm_eps: float = 1e-6
    pre_norm: bool = True  # OPT do_layer_norm_before; Llama layout is always pre-norm
    final_norm: bool = True  # OPT: False for post-LN models / _remove_final_layer_norm
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    layer_windows: tuple[int, ...] = ()  # sliding window per layer (0: full); () = none at all
    tie_word_embeddings: bool = False
    dropout_rate: float = 0.0  # residual / embedding dropout (OPT 0.1)
    attention_dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    loc_offset: int = 0  # id of <loc0>; = vocab_size when no tokenizer says otherwise
    loc_bins: int = 0  # number of location tokens; 0: the plain LLM
    # >0: location rows are learnt projections of the position embedding's sin/cos table of
    # this width (location_rows.rows_from_table); 0: free rows
    loc_table_dim: int = 0
    prefix_causal: bool = True  # False: slots < prefix_len attend bidirectionally
    dtype: str = "float32"  # compute dtype; params are always float32
    remat: bool = False  # rematerialise each layer in the backward pass
    scan_layers: bool = False  # stack layers on a leading axis and run them with nn.scan
    attention_impl: str | None = None  # None / "xla" | "cudnn" (llm3d_jax.model.attention)

    def __post_init__(self):
        attention.check_implementation(self.attention_impl)
        # A config read back from JSON has a list here; keep the dataclass hashable.
        object.__setattr__(self, "layer_windows", tuple(int(w) for w in self.layer_windows))
        if self.family not in FAMILIES:
            raise ValueError(f"unknown decoder family {self.family!r} (expected one of {FAMILIES})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {self.rope_type!r} (supported: {', '.join(ROPE_TYPES)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers"
            )
        location_rows.check_config(self.loc_offset, self.loc_bins, self.vocab_size)

    @property
    def num_logits(self) -> int:
        """Width of the logits (and the id space): base tokens then location tokens."""
        return location_rows.num_logits(self.vocab_size, self.loc_offset, self.loc_bins)

    @property
    def token_dim(self) -> int:
        """Width of the token embeddings (and of `inputs_embeds`)."""
        return self.embed_dim or self.hidden_size

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def forward_flops(self, prefix_len: int, answer_len: int) -> int:
        """Matmul FLOPs of one example's forward pass over [prefix; answer] with logits at the
        answer slots (the LLM interface's FLOP count, for MFU); attention over the whole square,
        as for T5."""
        seq, d = prefix_len + answer_len, self.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        ffn_mats = 3 if self.family == "llama" else 2  # gate, up, down | fc1, fc2
        layer = (
            2 * seq * 2 * d * q_width  # q, o
            + 2 * seq * 2 * d * kv_width  # k, v (fewer heads with GQA)
            + attention.flops(seq, seq, q_width)
            + 2 * seq * ffn_mats * d * self.intermediate_size
        )
        projections = 0
        if self.token_dim != d:  # OPT project_in over every slot, project_out where logits are read
            projections = 2 * seq * self.token_dim * d + 2 * seq * d * self.token_dim
        lm_head = 2 * answer_len * self.token_dim * self.num_logits
        return self.num_layers * layer + projections + lm_head

    @classmethod
    def tiny(cls, family: str = "llama", **overrides) -> DecoderConfig:
        """A small model for unit tests and the CPU demo. `family` is a key of MODEL_TYPES:
        llama (GQA), qwen2 (llama + q/k/v biases), mistral (llama + a sliding window), opt
        (pre-LN, biases, tied embeddings)."""
        if family not in MODEL_TYPES:
            raise ValueError(
                f"unknown model type {family!r} (expected one of {sorted(MODEL_TYPES)})"
            )
        variant, family = family, MODEL_TYPES[family]
        base = dict(
            family=family,
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2 if family == "llama" else 4,
            head_dim=8,
            max_position_embeddings=128,
        )
        if family == "opt":
            base.update(
                activation="relu",
                norm_eps=1e-5,
                qkv_bias=True,
                out_bias=True,
                mlp_bias=True,
                tie_word_embeddings=True,
            )
        if variant == "qwen2":
            base.update(qkv_bias=True)
        base.update(overrides)
        if variant == "mistral" and "layer_windows" not in overrides:
            base.update(layer_windows=(8,) * base["num_layers"])
        return cls(**base)

    @classmethod
    def from_hf(cls, config: dict, **overrides) -> DecoderConfig:
        """From a HF config.json dict of model_type opt, llama, qwen2 or mistral.

        Reads both rope layouts: transformers 5 `rope_parameters` and the older `rope_theta` +
        `rope_scaling`.
        """
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} (expected one of {sorted(MODEL_TYPES)})"
            )
        get = config.get
        hidden = int(get("hidden_size", 4096))
        heads = int(get("num_attention_heads", 32))
        layers = int(get("num_hidden_layers", 32))
        if model_type == "opt":
            if not get("layer_norm_elementwise_affine", True):
                raise ValueError("OPT without LayerNorm affine parameters is not supported")
            pre_norm = bool(get("do_layer_norm_before", True))
            bias = bool(get("enable_bias", True))
            kwargs = dict(
                family="opt",
                vocab_size=int(get("vocab_size", 50272)),
                hidden_size=hidden,
                intermediate_size=int(get("ffn_dim", 3072)),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                embed_dim=int(get("word_embed_proj_dim") or hidden),
                max_position_embeddings=int(get("max_position_embeddings", 2048)),
                activation=get("activation_function", "relu"),
                norm_eps=1e-5,  # torch.nn.LayerNorm default; OPT has no eps field
                pre_norm=pre_norm,
                final_norm=pre_norm and not get("_remove_final_layer_norm", False),
                qkv_bias=bias,
                out_bias=bias,
                mlp_bias=bias,
                tie_word_embeddings=bool(get("tie_word_embeddings", True)),
                dropout_rate=float(get("dropout", 0.1)),
                attention_dropout=float(get("attention_dropout", 0.0)),
                bos_token_id=_token_id(get("bos_token_id"), 2),
                eos_token_id=_token_id(get("eos_token_id"), 2),
                pad_token_id=_token_id(get("pad_token_id"), 1),
            )
        else:
            rope = dict(get("rope_parameters") or get("rope_scaling") or {})
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            rope_theta = float(rope.get("rope_theta", get("rope_theta", 10000.0)))
            if rope.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) != 1.0:
                raise ValueError("partial rotary embeddings are not supported")
            attention_bias = bool(get("attention_bias", False))
            kwargs = dict(
                family="llama",
                vocab_size=int(get("vocab_size", 32000)),
                hidden_size=hidden,
                intermediate_size=int(get("intermediate_size", 11008)),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(get("num_key_value_heads") or heads),
                head_dim=int(get("head_dim") or hidden // heads),
                max_position_embeddings=int(get("max_position_embeddings", 2048)),
                activation=get("hidden_act", "silu"),
                norm_eps=float(get("rms_norm_eps", 1e-6)),
                qkv_bias=attention_bias or model_type == "qwen2",
                out_bias=attention_bias,
                mlp_bias=bool(get("mlp_bias", False)),
                rope_theta=rope_theta,
                rope_type=rope_type,
                rope_factor=float(rope.get("factor", 1.0)),
                rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                rope_original_max_positions=int(
                    rope.get("original_max_position_embeddings")
                    or get("max_position_embeddings", 8192)
                ),
                layer_windows=_layer_windows(config, model_type, layers),
                tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                attention_dropout=float(get("attention_dropout", 0.0)),
                bos_token_id=_token_id(get("bos_token_id"), 1),
                eos_token_id=_token_id(get("eos_token_id"), 2),
                pad_token_id=_token_id(get("pad_token_id"), 0),
            )
        kwargs["loc_offset"] = kwargs["vocab_size"]
        kwargs.update(overrides)
        return cls(**kwargs)


def _token_id(value, default: int) -> int:
    """HF token ids may be None or a list (several EOS ids): the first one, or the default."""
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


def _layer_windows(config: dict, model_type: str, layers: int) -> tuple[int, ...]:
    """Per-layer sliding windows of a Llama-layout HF config (() when no layer has one)."""
    window = config.get("sliding_window")
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    if not window:
        return ()
    types = config.get("layer_types")
    if types is None and model_type == "qwen2":
        first = int(config.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if types is None:  # Mistral: every layer
        types = ["sliding_attention"] * layers
    if len(types) != layers:
        raise ValueError(f"layer_types has {len(types)} entries for {layers} layers")
    windows = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies, HF's formulas in float32."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(
        np.float32
    )
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        factor = np.float32(config.rope_factor)
        low, high = (
            np.float32(config.rope_low_freq_factor),
            np.float32(config.rope_high_freq_factor),
        )
        old_len = np.float32(config.rope_original_max_positions)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(config: DecoderConfig, positions):
    """positions int [B,L] -> (cos, sin) float32 [B,L,head_dim] (rotate-half layout)."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [B,L,N,D], cos/sin [B,L,D] -> x rotated (HF `rotate_half` convention), x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None] + rotated * sin[:, :, None]
    return out.astype(x.dtype)


def default_positions(attention_mask):
    """mask [B,L] -> int32 [B,L]: real tokens numbered 0, 1, ... per row; padding gets -1."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask - 1


def _param_init(std: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def _zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros, names)


class Norm(nn.Module):
    """LayerNorm (OPT: scale and bias) or RMSNorm (Llama: scale only); statistics in float32.
    [..., d] -> [..., d] in the compute dtype."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        d = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,)
        )
        x32 = x.astype(jnp.float32)
        if c.family == "opt":
            bias = self.param("bias", _zeros(("norm",)), (d,))
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + c.norm_eps) * scale + bias
            return y.astype(c.compute_dtype)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(variance + c.norm_eps)).astype(c.compute_dtype)
        return scale.astype(c.compute_dtype) * y


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention.

    __call__: x [B,Lq,d], (cos, sin) [B,Lq,hd] | None, mask bool [B,Lq,Lk], kv_cache
    (k [B,Lk,KV,hd], v, write bool [B,Lk]) | None -> (out [B,Lq,d], (k, v) of x [B,Lq,KV,hd]).
    With a cache, the new keys/values are written at `write` and attention runs over the cache.
    """

    config: DecoderConfig

    def setup(self):
        c = self.config
        dense = partial(nn.Dense, dtype=c.compute_dtype, param_dtype=jnp.float32)
        init = partial(_param_init, c.init_std)
        self.q = dense(
            c.num_heads * c.head_dim,
            use_bias=c.qkv_bias,
            kernel_init=init(("embed", "heads")),
            bias_init=_zeros(("heads",)),
        )
        self.k = dense(
            c.num_kv_heads * c.head_dim,
            use_bias=c.qkv_bias,
            kernel_init=init(("embed", "kv")),
            bias_init=_zeros(("kv",)),
        )
        self.v = dense(
            c.num_kv_heads * c.head_dim,
            use_bias=c.qkv_bias,
            kernel_init=init(("embed", "kv")),
            bias_init=_zeros(("kv",)),
        )
        self.o = dense(
            c.hidden_size,
            use_bias=c.out_bias,
            kernel_init=init(("heads", "embed")),
            bias_init=_zeros(("embed",)),
        )
        self.dropout = nn.Dropout(c.attention_dropout)

    def __call__(self, x, rope, mask, kv_cache, deterministic: bool):
        c = self.config
        b, length = x.shape[:2]
        # [B,Lq,N*hd] and [B,Lq,KV*hd], split over the heads, -> [B,Lq,N|KV,hd]
        q = nn.with_logical_constraint(self.q(x), ("batch", "length", "heads"))
        k = nn.with_logical_constraint(self.k(x), ("batch", "length", "kv"))
        v = nn.with_logical_constraint(self.v(x), ("batch", "length", "kv"))
        q = q.reshape(b, length, c.num_heads, c.head_dim)
        k = k.reshape(b, length, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, length, c.num_kv_heads, c.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        new_kv = (k, v)
        if kv_cache is not None:
            cache_k, cache_v, write = kv_cache
            slot = write[:, :, None, None]
            k = jnp.where(slot, k.astype(cache_k.dtype), cache_k)
            v = jnp.where(slot, v.astype(cache_v.dtype), cache_v)
        training = not deterministic and c.attention_dropout > 0
        out = attention.dot_product_attention(
            q,  # [B,Lq,N,hd]
            k.astype(c.compute_dtype),  # [B,Lk,KV,hd]: grouped-query when KV < N
            v.astype(c.compute_dtype),
            mask=mask[:, None],  # [B,1,Lq,Lk]
            scale=c.head_dim**-0.5,
            dropout=partial(self.dropout, deterministic=False) if training else None,
            implementation=c.attention_impl,
        )  # [B,Lq,N,hd]
        out = out.reshape(b, length, c.num_heads * c.head_dim)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads"))  # [B,Lq,N*hd]
        return self.o(out), new_kv


class MLP(nn.Module):
    """[B,L,d] -> [B,L,d]: down(act(gate x) * up x) (Llama) or down(act(up x)) (OPT fc1/fc2)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = partial(
            nn.Dense,
            use_bias=c.mlp_bias,
            dtype=c.compute_dtype,
            param_dtype=jnp.float32,
            kernel_init=_param_init(c.init_std, ("embed", "mlp")),
            bias_init=_zeros(("mlp",)),
        )
        act = ACTIVATIONS[c.activation]
        up = dense(c.intermediate_size, name="up")(x)
        if c.family == "llama":
            h = act(dense(c.intermediate_size, name="gate")(x)) * up
        else:
            h = act(up)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))  # [B,L,F]
        return nn.Dense(
            c.hidden_size,
            use_bias=c.mlp_bias,
            dtype=c.compute_dtype,
            param_dtype=jnp.float32,
            kernel_init=_param_init(c.init_std, ("mlp", "embed")),
            bias_init=_zeros(("embed",)),
            name="down",
        )(h)


class DecoderLayer(nn.Module):
    """One transformer layer (pre- or post-norm).

    __call__(x [B,Lq,d], layer {"index", "window"}, ctx, deterministic, return_kv)
    -> (x [B,Lq,d], (k, v) [B,Lq,KV,hd] | None). `ctx` is shared by all layers: `rope`
    (cos, sin) | None, `mask` bool [B,Lq,Lk] (padding, causal / prefix), `q_slot` [B,Lq] and
    `k_slot` [Lk] (sequence slots, for sliding windows) and, when decoding, `cache_k`/`cache_v`
    [B,layers,Lk,KV,hd] and `write` bool [B,Lk]. The signature is the same with and without
    nn.scan (then `layer` holds traced scalars).
    """

    config: DecoderConfig

    def setup(self):
        self.attn_norm = Norm(self.config)
        self.attn = Attention(self.config)
        self.mlp_norm = Norm(self.config)
        self.mlp = MLP(self.config)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x, layer, ctx, deterministic: bool, return_kv: bool):
        c = self.config
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))  # [B,Lq,d]
        mask = ctx["mask"]
        if c.layer_windows:
            window = layer["window"]
            in_window = ctx["k_slot"][None, None, :] > ctx["q_slot"][:, :, None] - window
            mask = mask & ((window <= 0) | in_window)
        kv_cache = None
        if "cache_k" in ctx:
            index = layer["index"]
            take = partial(jax.lax.dynamic_index_in_dim, index=index, axis=1, keepdims=False)
            kv_cache = (take(ctx["cache_k"]), take(ctx["cache_v"]), ctx["write"])
        h = self.attn_norm(x) if c.pre_norm else x
        h, kv = self.attn(h, ctx["rope"], mask, kv_cache, deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        if not c.pre_norm:
            x = self.attn_norm(x)
        h = self.mlp(self.mlp_norm(x) if c.pre_norm else x)
        x = x + self.dropout(h, deterministic=deterministic)
        if not c.pre_norm:
            x = self.mlp_norm(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, (kv if return_kv else None)


class Decoder(nn.Module):
    """Decoder-only LM with optional location-token rows.

    __call__(input_ids [B,L] | inputs_embeds [B,L,token_dim], attention_mask [B,L], positions
    [B,L]?, prefix_len [B]?) -> logits float32 [B,L,num_logits] (`logits[:, t]` scores the token
    after slot t).
    """

    config: DecoderConfig

    def setup(self):
        c = self.config
        e = c.token_dim
        self.embed_tokens = self.param(
            "embed_tokens", _param_init(c.init_std, ("vocab", "embed")), (c.vocab_size, e)
        )
        if c.loc_bins:
            # Small tables: replicated (None) rather than split over the vocab axis.
            self.loc_embed = self.param(
                "loc_embed",
                _param_init(c.init_std, (None, "embed")),
                (c.loc_table_dim or c.loc_bins, e),
            )
        if not c.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", _param_init(c.init_std, ("embed", "vocab")), (e, c.vocab_size)
            )
            if c.loc_bins:
                self.loc_head = self.param(
                    "loc_head",
                    _param_init(c.init_std, ("embed", None)),
                    (e, c.loc_table_dim or c.loc_bins),
                )
        if c.family == "opt":
            self.embed_positions = self.param(
                "embed_positions",
                _param_init(c.init_std, ("pos", "embed")),
                (c.max_position_embeddings + 2, c.hidden_size),
            )
        if e != c.hidden_size:
            self.project_in = self.param(
                "project_in", _param_init(c.init_std, (None, "embed")), (e, c.hidden_size)
            )
            self.project_out = self.param(
                "project_out", _param_init(c.init_std, ("embed", None)), (c.hidden_size, e)
            )
        if c.final_norm:
            self.final_norm = Norm(c)
        self.dropout = nn.Dropout(c.dropout_rate)
        # deterministic and return_kv (arguments 4 and 5, counting self) are static under remat.
        layer = nn.remat(DecoderLayer, static_argnums=(4, 5)) if c.remat else DecoderLayer
        if c.scan_layers:
            self.layers = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c)
        else:
            self.layers = [layer(c) for _ in range(c.num_layers)]

    # -- pieces ------------------------------------------------------------------------------

    def embed(self, ids):
        """ids int [B,L] (base ids below loc_offset, location ids after) -> [B,L,token_dim]."""
        c = self.config
        loc_table = None
        if c.loc_bins:
            loc_table, _ = location_rows.rows_from_table(
                self.loc_embed, None, c.loc_bins, c.loc_table_dim
            )
        return location_rows.embed(
            ids, self.embed_tokens, loc_table, c.loc_offset, c.loc_bins, c.compute_dtype
        )

    def logits(self, h):
        """Final hidden states [..., token_dim] -> float32 logits [..., num_logits]."""
        c = self.config
        tied = c.tie_word_embeddings
        head = self.embed_tokens if tied else self.lm_head
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

    def _inputs(self, x, positions, deterministic):
        """Token embeddings [B,L,token_dim] -> (layer input [B,L,d], rope tables or None)."""
        c = self.config
        x = x.astype(c.compute_dtype)
        if c.token_dim != c.hidden_size:
            x = x @ self.project_in.astype(c.compute_dtype)
        rope = None
        if c.family == "opt":
            table = self.embed_positions.astype(c.compute_dtype)
            x = x + jnp.take(table, positions + 2, axis=0, mode="clip")
        else:
            rope = rope_tables(c, positions)
        return self.dropout(x, deterministic=deterministic), rope

    def _outputs(self, x):
        """Last layer output [B,L,d] -> final hidden states [B,L,token_dim]."""
        c = self.config
        if c.final_norm:
            x = self.final_norm(x)
        if c.token_dim != c.hidden_size:
            x = x @ self.project_out.astype(c.compute_dtype)
        return x

    def _run_layers(self, x, ctx, deterministic: bool, return_kv: bool):
        """-> (x, stacked (k, v) [B,layers,L,KV,hd] or None)."""
        c = self.config
        windows = c.layer_windows or (0,) * c.num_layers
        if c.scan_layers:
            layer = dict(index=jnp.arange(c.num_layers), window=jnp.asarray(windows, jnp.int32))
            x, kv = self.layers(x, layer, ctx, deterministic, return_kv)
            if return_kv:
                kv = tuple(jnp.moveaxis(a, 0, 1) for a in kv)
            return x, kv
        kvs = []
        for i, layer_module in enumerate(self.layers):
            x, kv = layer_module(x, dict(index=i, window=windows[i]), ctx, deterministic, return_kv)
            kvs.append(kv)
        if not return_kv:
            return x, None
        return x, tuple(jnp.stack(a, axis=1) for a in zip(*kvs))

    def _mask(self, attention_mask, prefix_len):
        """Key padding, causal and prefix-LM rules -> bool [B,L,L]."""
        length = attention_mask.shape[1]
        slots = jnp.arange(length)
        allowed = slots[None, :] <= slots[:, None]
        allowed = jnp.broadcast_to(allowed, (attention_mask.shape[0], length, length))
        if prefix_len is not None and not self.config.prefix_causal:
            in_prefix = slots[None, :] < prefix_len[:, None]  # [B, L]
            allowed = allowed | (in_prefix[:, None, :] & in_prefix[:, :, None])
        return allowed & attention_mask.astype(bool)[:, None, :]

    # -- full sequences ----------------------------------------------------------------------

    def hidden(
        self,
        input_ids=None,
        attention_mask=None,
        positions=None,
        inputs_embeds=None,
        prefix_len=None,
        deterministic: bool = True,
        return_kv: bool = False,
    ):
        """-> final hidden states [B,L,token_dim] (and the stacked (k, v) with return_kv)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool)
        if positions is None:
            positions = default_positions(attention_mask)
        x, rope = self._inputs(x, positions, deterministic)
        slots = jnp.arange(length)
        ctx = dict(
            rope=rope,
            mask=self._mask(attention_mask, prefix_len),
            q_slot=jnp.broadcast_to(slots, (batch, length)),
            k_slot=slots,
        )
        x, kv = self._run_layers(x, ctx, deterministic, return_kv)
        h = self._outputs(x)
        return (h, kv) if return_kv else h

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        positions=None,
        inputs_embeds=None,
        prefix_len=None,
        deterministic: bool = True,
    ):
        h = self.hidden(
            input_ids, attention_mask, positions, inputs_embeds, prefix_len, deterministic
        )
        return self.logits(h)

    def answer_logits(
        self, prefix_embeds, prefix_mask, answer_ids, answer_mask, deterministic: bool = True
    ):
        """The 3D-LLM layout [prefix; answer] with loss on the answer only.

        prefix_embeds [B,P,token_dim] (projected queries then the embedded prompt; padding may
        sit anywhere), prefix_mask [B,P], answer_ids / answer_mask [B,La] -> logits float32
        [B,La,num_logits] where `logits[:, t]` scores `answer_ids[:, t]`: the output at the
        previous real token (the last real prefix slot for t = 0). The whole prefix is
        bidirectional when `prefix_causal` is False. `prefill` + `decode_step` give the same
        numbers token by token.
        """
        batch, p = prefix_embeds.shape[:2]
        x = jnp.concatenate(
            [prefix_embeds.astype(self.config.compute_dtype), self.embed(answer_ids)], axis=1
        )
        mask = jnp.concatenate([prefix_mask, answer_mask], axis=1).astype(bool)
        prefix_len = jnp.full((batch,), p, jnp.int32)
        h = self.hidden(None, mask, None, x, prefix_len, deterministic)
        last = jnp.max(jnp.where(prefix_mask.astype(bool), jnp.arange(p), 0), axis=1)
        later = jnp.broadcast_to(
            p + jnp.arange(answer_ids.shape[1] - 1), (batch, answer_ids.shape[1] - 1)
        )
        reads = jnp.concatenate([last[:, None], later], axis=1)  # [B, La]
        return self.logits(jnp.take_along_axis(h, reads[..., None], axis=1))

    # -- decoding ----------------------------------------------------------------------------

    def prefill(
        self,
        input_ids=None,
        attention_mask=None,
        max_decode_len: int = 0,
        positions=None,
        inputs_embeds=None,
        prefix_len=None,
    ):
        """Runs the prefix [B,L] once -> (cache with room for `max_decode_len` more tokens,
        logits [B,num_logits] of the token after each row's last real slot)."""
        c = self.config
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = default_positions(attention_mask)
        h, (k, v) = self.hidden(
            None, attention_mask, positions, x, prefix_len, deterministic=True, return_kv=True
        )
        slots = jnp.arange(length)
        last = jnp.max(jnp.where(attention_mask, slots, 0), axis=1)
        logits = self.logits(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
        pad = ((0, 0), (0, 0), (0, max_decode_len), (0, 0), (0, 0))
        cache = dict(
            k=jnp.pad(k.astype(c.compute_dtype), pad),
            v=jnp.pad(v.astype(c.compute_dtype), pad),
            key_mask=jnp.pad(attention_mask, ((0, 0), (0, max_decode_len))),
            index=jnp.full((batch,), length, jnp.int32),
            position=(jnp.max(positions, axis=1) + 1).astype(jnp.int32),
        )
        return cache, logits

    def prefill_embeds(self, prefix_embeds, prefix_mask, max_decode_len: int):
        """The LLM interface's prefill (model/t5.py has the same): the 3D-LLM's prefix
        [B,P,token_dim] with its mask [B,P], bidirectional unless `prefix_causal` -> (cache,
        logits [B,num_logits] of the first answer token)."""
        batch, length = prefix_mask.shape
        return self.prefill(
            attention_mask=prefix_mask,
            max_decode_len=max_decode_len,
            inputs_embeds=prefix_embeds,
            prefix_len=jnp.full((batch,), length, jnp.int32),
        )

    def decode_step(self, cache, token_ids):
        """token_ids int [B] -> (logits [B,num_logits] of the next token, cache with the token
        written at slot cache['index'] with position id cache['position'])."""
        index, position = cache["index"], cache["position"]
        max_len = cache["key_mask"].shape[1]
        slots = jnp.arange(max_len)
        write = slots[None, :] == index[:, None]  # [B, Lmax]
        key_mask = cache["key_mask"] | write
        x, rope = self._inputs(self.embed(token_ids[:, None]), position[:, None], True)
        ctx = dict(
            rope=rope,
            mask=key_mask[:, None, :],
            q_slot=index[:, None],
            k_slot=slots,
            cache_k=cache["k"],
            cache_v=cache["v"],
            write=write,
        )
        x, (k_new, v_new) = self._run_layers(x, ctx, deterministic=True, return_kv=True)
        logits = self.logits(self._outputs(x)[:, 0])
        rows = jnp.arange(index.shape[0])
        # k_new [B, layers, 1, KV, hd] -> the slot `index` of each row (an in-place scatter).
        k = cache["k"].at[rows, :, index].set(k_new[:, :, 0].astype(cache["k"].dtype))
        v = cache["v"].at[rows, :, index].set(v_new[:, :, 0].astype(cache["v"].dtype))
        cache = dict(k=k, v=v, key_mask=key_mask, index=index + 1, position=position + 1)
        return logits, cache


def abstract_params(module: nn.Module, **inputs) -> dict:
    """ShapeDtypeStruct tree of `module`'s params (no memory, no compute)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))
    return nn.unbox(shapes)["params"]


def init_params(module: Decoder, seed: int = 0) -> dict:
    """Random float32 params of `module` (unboxed)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(jax.jit(module.init)(jax.random.key(seed), input_ids=ids))["params"]
