"""HF T5 / FlanT5 (`T5ForConditionalGeneration`) safetensors -> `llm3d_jax.model.t5` params.

The mapping table fills the unscanned layout (`encoder/block_<i>`, `decoder/block_<i>`); with
`scan_layers` the blocks are then stacked on a leading axis (`stack_blocks`; `unstack_blocks`
goes back). The same table serves a BLIP-2 directory with `prefix="language_model."`.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from llm3d_jax.convert.hf import Rule, apply_rules, stack_layers, transpose, unstack_layers
from llm3d_jax.fileio import InputError
from llm3d_jax.model import t5


def t5_rules(prefix: str = "") -> list[Rule]:
    """Mapping table HF key -> Flax path of `T5` (first match wins)."""
    p = re.escape(prefix)
    stack = rf"{p}(encoder|decoder)\.block\.(\d+)\.layer"
    return [
        (rf"{p}shared\.weight", "shared", None),
        # Tied copies of `shared` that some checkpoints also store.
        (rf"{p}(encoder|decoder)\.embed_tokens\.weight", None, None),
        (rf"{p}lm_head\.weight", "lm_head", transpose),
        # HF ignores this one too (only self-attention has a relative bias).
        (
            rf"{p}decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
            None,
            None,
        ),
        (rf"{stack}\.0\.SelfAttention\.relative_attention_bias\.weight", r"\1/relpos_bias", None),
        (
            rf"{stack}\.0\.SelfAttention\.([qkvo])\.weight",
            r"\1/block_\2/self_attn/\3/kernel",
            transpose,
        ),
        (rf"{stack}\.0\.layer_norm\.weight", r"\1/block_\2/self_attn_norm/scale", None),
        (
            rf"{p}decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.([qkvo])\.weight",
            r"decoder/block_\1/cross_attn/\2/kernel",
            transpose,
        ),
        (
            rf"{p}decoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight",
            r"decoder/block_\1/cross_attn_norm/scale",
            None,
        ),
        (
            rf"{p}encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight",
            r"encoder/block_\1/mlp/\2/kernel",
            transpose,
        ),
        (
            rf"{p}encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight",
            r"encoder/block_\1/mlp_norm/scale",
            None,
        ),
        (
            rf"{p}decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight",
            r"decoder/block_\1/mlp/\2/kernel",
            transpose,
        ),
        (
            rf"{p}decoder\.block\.(\d+)\.layer\.2\.layer_norm\.weight",
            r"decoder/block_\1/mlp_norm/scale",
            None,
        ),
        (rf"{p}(encoder|decoder)\.final_layer_norm\.weight", r"\1/final_norm/scale", None),
    ]


def stack_blocks(params: dict, config) -> dict:
    """T5 params with `block_<i>` subtrees in both stacks -> the `scan_layers` layout (one
    `block` subtree per stack, a leading axis of num_layers / num_decoder_layers)."""
    return {
        **params,
        "encoder": stack_layers(params["encoder"], config.num_layers, "block"),
        "decoder": stack_layers(params["decoder"], config.num_decoder_layers, "block"),
    }


def unstack_blocks(params: dict, config) -> dict:
    """The inverse of `stack_blocks`."""
    return {
        **params,
        "encoder": unstack_layers(params["encoder"], config.num_layers, "block"),
        "decoder": unstack_layers(params["decoder"], config.num_decoder_layers, "block"),
    }


def head_is_tied(tensors: dict[str, np.ndarray], prefix: str = "") -> bool:
    """Tied unless the checkpoint has an `lm_head` that differs from `shared` (what transformers 5
    does on load: its T5 config always says tied, the weights decide)."""
    head = tensors.get(prefix + "lm_head.weight")
    shared = tensors.get(prefix + "shared.weight")
    return head is None or (shared is not None and np.array_equal(head, shared))


def t5_params(
    hf_config: dict,
    tensors: dict[str, np.ndarray],
    source: str,
    prefix: str = "",
    loc_bins: int = 0,
    loc_offset: int | None = None,
    dtype: str = "float32",
    **overrides,
):
    """(T5 module, params) from a HF T5 config dict and its tensors (keys under `prefix`).

    Location rows (`loc_bins > 0`) are new parameters initialised by `init_location_rows` from
    the base rows; the base vocabulary comes from the checkpoint unchanged. `overrides` are
    T5Config fields (remat, scan_layers, ...).
    """

    tensors = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    tied = head_is_tied(tensors, prefix)
    try:
        config = t5.T5Config.from_hf(hf_config, dtype=dtype, loc_bins=loc_bins, **overrides)
        if loc_offset is not None:
            config = dataclasses.replace(config, loc_offset=loc_offset)
    except (ValueError, TypeError) as err:
        raise InputError(source, str(err)) from None
    if config.tie_word_embeddings != tied:
        # The weights decide (see head_is_tied); keep the config's rescale flag as written.
        config = dataclasses.replace(config, tie_word_embeddings=tied)
    rules = t5_rules(prefix)
    if tied:
        rules = [(rf"{re.escape(prefix)}lm_head\.weight", None, None), *rules]
    module = t5.T5(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    flat = t5.T5(dataclasses.replace(config, scan_layers=False))
    target = t5.abstract_params(flat, input_ids=ids, decoder_input_ids=ids)
    loc_names = ("loc_embed", "loc_head")
    base_target = {k: v for k, v in target.items() if k not in loc_names}
    params = apply_rules(tensors, rules, base_target, source=source)
    if config.scan_layers:
        params = stack_blocks(params, config)
    if loc_bins:
        params["loc_embed"] = t5.init_location_rows(params["shared"][: config.loc_offset], loc_bins)
        if not tied:
            head_rows = params["lm_head"].T[: config.loc_offset]
            params["loc_head"] = np.ascontiguousarray(
                t5.init_location_rows(head_rows, loc_bins, seed=1).T
            )
    return module, params
