"""Location-token rows shared by every LLM family (docs/architecture.md "Location tokens in the
model"): ids `>= loc_offset` read `loc_embed` rows, and the logits are
`concat(base_logits[..., :loc_offset], loc_logits)`, so a token id always equals its column."""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp


def check_config(loc_offset: int, loc_bins: int, vocab_size: int) -> None:
    """A config's location rows must start inside its base vocabulary."""
    if loc_bins and not 0 < loc_offset <= vocab_size:
        raise ValueError(f"loc_offset {loc_offset} must be in 1..vocab_size ({vocab_size})")


def num_logits(vocab_size: int, loc_offset: int, loc_bins: int) -> int:
    """Width of the logits (and the id space): base tokens then location tokens."""
    return loc_offset + loc_bins if loc_bins else vocab_size


def embed(ids, table, loc_table, loc_offset: int, loc_bins: int, dtype):
    """ids int [B,L] -> [B,L,d]: base rows of `table` [V,d], location rows of `loc_table` [B,d]."""
    if not loc_bins:
        return jnp.take(table, ids, axis=0).astype(dtype)
    is_loc = ids >= loc_offset
    base = jnp.take(table, jnp.where(is_loc, 0, ids), axis=0)
    loc = jnp.take(loc_table, jnp.clip(ids - loc_offset, 0, loc_bins - 1), axis=0)
    return jnp.where(is_loc[..., None], loc, base).astype(dtype)


def logits(h, head, loc_head, tied: bool, loc_offset: int, loc_bins: int, dtype):
    """h [..., d] -> float32 [..., loc_offset + loc_bins] (or [..., V] without location rows).

    tied: `head` is the [V,d] embedding table and `loc_head` the [B,d] location embedding;
    untied: `head` is [d,V] and `loc_head` [d,B]."""
    h = h.astype(dtype)
    project = partial(jnp.einsum, "...d,vd->...v" if tied else "...d,dv->...v")
    base = project(h, head.astype(dtype), preferred_element_type=jnp.float32)
    if not loc_bins:
        return base
    loc = project(h, loc_head.astype(dtype), preferred_element_type=jnp.float32)
    return jnp.concatenate([base[..., :loc_offset], loc], axis=-1)
