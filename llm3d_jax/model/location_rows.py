"""Location-token rows shared by every LLM family (docs/architecture.md "Location tokens in the
model"): ids `>= loc_offset` read `loc_embed` rows, and the logits are
`concat(base_logits[..., :loc_offset], loc_logits)`, so a token id always equals its column."""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp

from llm3d_jax.model.posembed import sincos_table

GRID = 256  # positions of the 3D position embedding (and voxels of the scene grid)


def check_config(loc_offset: int, loc_bins: int, vocab_size: int) -> None:
    """A config's location rows must start inside its base vocabulary."""
    if loc_bins and not 0 < loc_offset <= vocab_size:
        raise ValueError(f"loc_offset {loc_offset} must be in 1..vocab_size ({vocab_size})")


def num_logits(vocab_size: int, loc_offset: int, loc_bins: int) -> int:
    """Width of the logits (and the id space): base tokens then location tokens."""
    return loc_offset + loc_bins if loc_bins else vocab_size


def bin_table(loc_bins: int, table_dim: int) -> jnp.ndarray:
    """float32 [loc_bins, table_dim]: the position embedding's sin/cos row of each bin's centre
    voxel (bin i covers voxels [i * GRID / loc_bins, (i + 1) * GRID / loc_bins))."""
    table = jnp.asarray(sincos_table(GRID, table_dim))
    centre = ((jnp.arange(loc_bins) + 0.5) * GRID / loc_bins).astype(jnp.int32)
    return table[jnp.clip(centre, 0, GRID - 1)]


def rows_from_table(loc_embed, loc_head, loc_bins: int, table_dim: int):
    """With `table_dim > 0` the location rows are built from the position embedding's table:
    `loc_embed` [table_dim, d] -> rows [loc_bins, d] and `loc_head` [d, table_dim] (or None when
    tied) -> [d, loc_bins]. A bin's rows are linear in its sin/cos row, so a location token starts
    out like the points at that voxel and what is learnt for one bin carries to its neighbours."""
    if not table_dim:
        return loc_embed, loc_head
    table = bin_table(loc_bins, table_dim)  # [bins, C]
    rows = table @ loc_embed
    head = None if loc_head is None else loc_head @ table.T
    return rows, head


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
