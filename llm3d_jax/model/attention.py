"""The one attention of every model (Q-Former, T5, decoders, ViT): `jax.nn.dot_product_attention`.

    out [B,T,N,H] = softmax(scale * q k^T + bias, masked) v

q [B,T,N,H]; k, v [B,S,K,H] with N a multiple of K (grouped-query attention: query head n reads
key/value head n // (N // K)); bias float broadcastable to [B,N,T,S] (T5's relative position
bias); mask bool broadcastable to [B,N,T,S], True = attend; scale None: 1/sqrt(H) (T5: 1.0).
Logits and softmax are float32, the output has q's dtype. A fully masked query row attends
uniformly to every key (as the PyTorch references: they add the dtype's minimum).

`implementation` (each config's `attention_impl`): None or "xla" is XLA's fused einsums on any
backend; "cudnn" is cuDNN's fused (flash) attention on an NVIDIA GPU (float16 / bfloat16 compute
only, and cuDNN's own limits on head size; it raises where unsupported).

Dropout on the attention weights (training with a rate > 0) has no fused kernel: then `dropout`
(the caller's `nn.Dropout`, so its random stream is the module's own) is applied to the weights
of the same computation written out with einsums, whatever `implementation` says.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, "xla", "cudnn")


def flops(q_len: int, kv_len: int, width: int) -> int:
    """Matmul FLOPs of one attention (scores and weighted sum: two [q_len, kv_len] x width
    matmuls), over the whole square whatever the mask (XLA computes the masked part too)."""
    return 2 * 2 * q_len * kv_len * width


def check_implementation(value) -> None:
    """A config's `attention_impl` must be one of IMPLEMENTATIONS."""
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {value!r}")


def dot_product_attention(
    q,
    k,
    v,
    *,
    bias=None,
    mask=None,
    scale: float | None = None,
    dropout: Callable | None = None,
    implementation: str | None = None,
):
    """q [B,T,N,H], k/v [B,S,K,H], bias [B|1,N|1,T|1,S] float, mask [B|1,N|1,T|1,S] bool
    -> [B,T,N,H]. `dropout`: weights [B,K,G,T,S] -> weights, or None (no dropout)."""
    if dropout is None:
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation
        )
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    groups = n // kv_heads
    scale = h**-0.5 if scale is None else scale
    q = q.reshape(b, t, kv_heads, groups, h)
    # [B,T,K,G,H] x [B,S,K,H] -> [B,K,G,T,S]
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)

    def grouped(x):  # [B|1,N|1,T|1,S] -> [B|1,K|1,G|1,T|1,S]
        if x.shape[1] == 1:
            return x[:, :, None]
        return x.reshape(x.shape[0], kv_heads, groups, *x.shape[2:])

    if bias is not None:
        logits = logits + grouped(bias).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(grouped(mask), logits, jnp.finfo(jnp.float32).min)
    weights = dropout(jax.nn.softmax(logits, axis=-1)).astype(v.dtype)
    # [B,K,G,T,S] x [B,S,K,H] -> [B,T,K,G,H]
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v)
    return out.reshape(b, t, n, h)
