"""A whole HF BLIP-2 directory (`Blip2ForConditionalGeneration`) -> 3D-LLM.

    query_tokens, qformer.*        -> qformer/...      (convert.qformer table)
    language_projection.{weight,bias} -> proj/{kernel,bias}
    language_model.*               -> llm/...          (convert.t5 / convert.decoder: FlanT5, OPT)
    vision_model.*                 -> not read (3D-LLM reads point features, not images)

Or the Q-Former from BLIP-2 with another LLM (`llm_path`: HF T5 / OPT / Llama / Qwen2 / Mistral
directory): then the projection is new.

Location tokens: `llm/loc_embed` (and `llm/loc_head`) are new rows; with a tokenizer in the
directory, `<loc0>..` are added to it (`llm3d_jax.tokens.add_location_tokens`) and `loc_offset`
is the id of `<loc0>` there (32100 for the FlanT5 tokenizer), else the LLM's vocab size.
"""

from __future__ import annotations

import os

import numpy as np

from llm3d_jax.convert.decoder import decoder_params
from llm3d_jax.convert.hf import apply_rules, read_hf_dir, transpose
from llm3d_jax.convert.qformer import blip2_qformer_rules
from llm3d_jax.convert.t5 import t5_params
from llm3d_jax.fileio import InputError
from llm3d_jax.model import llm3d, qformer
from llm3d_jax.model.decoder import MODEL_TYPES
from llm3d_jax.tokens import add_location_tokens

LM_PREFIX = "language_model."
PROJECTION_RULES = [
    (r"language_projection\.weight", "proj/kernel", transpose),
    (r"language_projection\.bias", "proj/bias", None),
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def tokenizer_loc_offset(path: str, loc_bins: int) -> int | None:
    """Id of `<loc0>` after adding the location tokens to the directory's tokenizer, or None
    when the directory has no tokenizer."""
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from llm3d_jax.tokens import load_tokenizer

    tokenizer = load_tokenizer(path)
    try:
        return add_location_tokens(tokenizer, loc_bins)
    except ValueError as err:
        raise InputError(path, f"tokenizer: {err}") from None


def language_model(hf_config: dict, tensors, source: str, prefix: str, **kwargs):
    """(LLM module, params) for a HF T5 or decoder-only config dict and its tensors."""

    model_type = hf_config.get("model_type", "t5")
    if model_type == "t5":
        return t5_params(hf_config, tensors, source=source, prefix=prefix, **kwargs)
    if model_type in MODEL_TYPES:
        return decoder_params(hf_config, tensors, source=source, prefix=prefix, **kwargs)
    raise InputError(
        source,
        f"unsupported language model {model_type!r} (T5 / FlanT5, OPT, Llama, Qwen2, Mistral)",
    )


def load_blip2(
    path: str | os.PathLike,
    loc_bins: int = 256,
    dtype: str = "float32",
    llm_path: str | os.PathLike | None = None,
    seed: int = 0,
):
    """(LLM3D module, host params) from a HF BLIP-2 directory (T5 or OPT language model).

    With `llm_path` (a HF T5 / OPT / Llama / Qwen2 / Mistral directory) the LLM and the tokenizer
    come from there instead, and the projection (whose width changes) is freshly initialised
    (normal(initializer_range), zero bias; `seed`).
    """

    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    # The vision tower is never used by 3D-LLM (nor the BLIP-2 LLM when llm_path replaces it).
    skip = (
        r"vision_model\.|language_model\.|language_projection\." if llm_path else r"vision_model\."
    )
    config, tensors = read_hf_dir(path, keep=rf"(?!(model\.)?(?:{skip}))")
    if config.get("model_type") != "blip-2":
        raise InputError(
            config_path,
            f"unsupported architecture model_type={config.get('model_type')!r} (expected 'blip-2')",
        )
    if llm_path is None:
        llm_source, prefix = path, LM_PREFIX
        text, llm_tensors = config.get("text_config") or {}, tensors
    else:
        llm_source, prefix = os.fspath(llm_path), ""
        text, llm_tensors = read_hf_dir(llm_source)
    loc_offset = tokenizer_loc_offset(llm_source, loc_bins) if loc_bins else None
    vocab = int(text.get("vocab_size", 32128))
    if loc_offset is not None and loc_offset > vocab:
        raise InputError(
            llm_source, f"tokenizer has {loc_offset} tokens, more than the LLM vocabulary ({vocab})"
        )
    llm_module, llm_params = language_model(
        text, llm_tensors, llm_source, prefix, loc_bins=loc_bins, loc_offset=loc_offset, dtype=dtype
    )
    qformer_config = qformer.QFormerConfig.from_hf(config, dtype=dtype)
    model_config = llm3d.LLM3DConfig(
        qformer=qformer_config,
        llm=llm_module.config,
        feature_dim=qformer_config.encoder_hidden_size,
    )
    module = llm3d.LLM3D(model_config)
    target = {k: v for k, v in llm3d.abstract_params(module).items() if k != "llm"}
    rest = {k: v for k, v in tensors.items() if not k.startswith(LM_PREFIX)}
    rules = blip2_qformer_rules(dst="qformer/")
    if llm_path is None:
        params = apply_rules(rest, PROJECTION_RULES + rules, target, source=path)
    else:
        shape = target.pop("proj")["kernel"].shape
        params = apply_rules(rest, rules, target, source=path)
        std = qformer_config.initializer_range
        kernel = std * np.random.default_rng(seed).standard_normal(shape)
        params["proj"] = {
            "kernel": kernel.astype(np.float32),
            "bias": np.zeros(shape[1:], np.float32),
        }
    params["llm"] = llm_params
    return module, params
