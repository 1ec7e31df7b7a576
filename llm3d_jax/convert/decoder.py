"""HF causal LMs (OPT, Llama, Qwen2, Mistral) safetensors -> `llm3d_jax.model.decoder` params.

One mapping table per family (HF key regex -> Flax path of the unscanned layout, torch Linear
weights transposed); with `scan_layers` the per-layer trees are then stacked on a leading axis.
The same tables serve a BLIP-2 directory with `prefix="language_model."`. Sharded checkpoints
(model.safetensors.index.json) are read by `llm3d_jax.convert.hf`.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from llm3d_jax.convert.hf import Rule, apply_rules, stack_layers, transpose
from llm3d_jax.fileio import InputError
from llm3d_jax.model import decoder
from llm3d_jax.model.t5 import init_location_rows


def _linear(hf: str, flax: str) -> list[Rule]:
    """A torch Linear (weight, optional bias) -> a Flax Dense (kernel, bias)."""
    return [
        (rf"{hf}\.weight", rf"{flax}/kernel", transpose),
        (rf"{hf}\.bias", rf"{flax}/bias", None),
    ]


def _norm(hf: str, flax: str) -> list[Rule]:
    return [(rf"{hf}\.weight", rf"{flax}/scale", None), (rf"{hf}\.bias", rf"{flax}/bias", None)]


def opt_rules(prefix: str = "") -> list[Rule]:
    """Mapping table for `OPTForCausalLM` (`model.decoder.*`) and `OPTModel` (`decoder.*`)."""
    p = rf"{re.escape(prefix)}(?:model\.)?decoder\."
    layer = rf"{p}layers\.(\d+)\."
    return [
        (rf"{p}embed_tokens\.weight", "embed_tokens", None),
        (rf"{p}embed_positions\.weight", "embed_positions", None),
        (rf"{p}project_in\.weight", "project_in", transpose),
        (rf"{p}project_out\.weight", "project_out", transpose),
        *_norm(rf"{p}final_layer_norm", "final_norm"),
        *_linear(rf"{layer}self_attn\.([qkv])_proj", r"layers_\1/attn/\2"),
        *_linear(rf"{layer}self_attn\.out_proj", r"layers_\1/attn/o"),
        *_norm(rf"{layer}self_attn_layer_norm", r"layers_\1/attn_norm"),
        *_linear(rf"{layer}fc1", r"layers_\1/mlp/up"),
        *_linear(rf"{layer}fc2", r"layers_\1/mlp/down"),
        *_norm(rf"{layer}final_layer_norm", r"layers_\1/mlp_norm"),
        (rf"{re.escape(prefix)}lm_head\.weight", "lm_head", transpose),
    ]


def llama_rules(prefix: str = "") -> list[Rule]:
    """Mapping table for `LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`."""
    p = rf"{re.escape(prefix)}model\."
    layer = rf"{p}layers\.(\d+)\."
    return [
        (rf"{p}embed_tokens\.weight", "embed_tokens", None),
        (rf"{p}norm\.weight", "final_norm/scale", None),
        # Buffers some older checkpoints stored; recomputed from the config.
        (rf"{p}(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", None, None),
        *_linear(rf"{layer}self_attn\.([qkvo])_proj", r"layers_\1/attn/\2"),
        (rf"{layer}input_layernorm\.weight", r"layers_\1/attn_norm/scale", None),
        (rf"{layer}post_attention_layernorm\.weight", r"layers_\1/mlp_norm/scale", None),
        *_linear(rf"{layer}mlp\.(gate|up|down)_proj", r"layers_\1/mlp/\2"),
        (rf"{re.escape(prefix)}lm_head\.weight", "lm_head", transpose),
    ]


RULES = {"opt": opt_rules, "llama": llama_rules}


def decoder_params(
    hf_config: dict,
    tensors: dict[str, np.ndarray],
    source: str,
    prefix: str = "",
    loc_bins: int = 0,
    loc_offset: int | None = None,
    dtype: str = "float32",
    **overrides,
):
    """(Decoder module, params) from a HF causal-LM config dict and its tensors (keys under
    `prefix`). Location rows (`loc_bins > 0`) are new parameters initialised by
    `init_location_rows` from the base rows; the base vocabulary is the checkpoint's."""

    tensors = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        config = decoder.DecoderConfig.from_hf(
            hf_config, dtype=dtype, loc_bins=loc_bins, **overrides
        )
        if loc_offset is not None:
            config = dataclasses.replace(config, loc_offset=loc_offset)
    except (ValueError, TypeError) as err:
        raise InputError(source, str(err)) from None
    rules = RULES[config.family](prefix)
    if config.tie_word_embeddings:
        # The head is the embedding (HF ties it on load even where a copy was saved).
        rules = [(rf"{re.escape(prefix)}lm_head\.weight", None, None), *rules]
    flat = dataclasses.replace(config, scan_layers=False, loc_bins=0)
    target = decoder.abstract_params(decoder.Decoder(flat), input_ids=jnp.zeros((1, 1), jnp.int32))
    params = apply_rules(tensors, rules, target, source=source)
    if config.scan_layers:
        params = stack_layers(params, config.num_layers)
    if loc_bins:
        base = params["embed_tokens"][: config.loc_offset]
        params["loc_embed"] = init_location_rows(base, loc_bins)
        if not config.tie_word_embeddings:
            head_rows = params["lm_head"].T[: config.loc_offset]
            params["loc_head"] = np.ascontiguousarray(
                init_location_rows(head_rows, loc_bins, seed=1).T
            )
    return decoder.Decoder(config), params
