"""A whole HF BLIP-2 directory (`Blip2ForConditionalGeneration`, T5 language model) -> 3D-LLM.

    query_tokens, qformer.*        -> qformer/...      (convert.qformer table)
    language_projection.{weight,bias} -> proj/{kernel,bias}
    language_model.*               -> llm/...          (convert.t5 table)
    vision_model.*                 -> dropped (3D-LLM reads point features, not images)

Location tokens: `llm/loc_embed` (and `llm/loc_head`) are new rows; with a tokenizer in the
directory, `<loc0>..` are added to it (`llm3d_jax.tokens.add_location_tokens`) and `loc_offset`
is the id of `<loc0>` there (32100 for the FlanT5 tokenizer), else the T5 vocab size.
"""

from __future__ import annotations

import os

from llm3d_jax.convert.hf import apply_rules, read_hf_dir, transpose
from llm3d_jax.convert.qformer import blip2_qformer_rules
from llm3d_jax.convert.t5 import t5_params
from llm3d_jax.fileio import InputError

LM_PREFIX = "language_model."
PROJECTION_RULES = [
    (r"language_projection\.weight", "proj/kernel", transpose),
    (r"language_projection\.bias", "proj/bias", None),
]
KEEP = r"(?:qformer\.|query_tokens|language_projection\.|language_model\.)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def tokenizer_loc_offset(path: str, loc_bins: int) -> int | None:
    """Id of `<loc0>` after adding the location tokens to the directory's tokenizer, or None
    when the directory has no tokenizer."""
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    from llm3d_jax.tokens import add_location_tokens

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises many types for a broken tokenizer
        raise InputError(path, f"unreadable tokenizer ({type(err).__name__}: {err})") from None
    try:
        return add_location_tokens(tokenizer, loc_bins)
    except ValueError as err:
        raise InputError(path, f"tokenizer: {err}") from None


def load_blip2(path: str | os.PathLike, loc_bins: int = 256, dtype: str = "float32"):
    """(LLM3D module, host params) from a HF BLIP-2 directory with a T5 language model."""
    from llm3d_jax.model import llm3d, qformer

    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    # The vision tower is never used by 3D-LLM: not even read.
    config, tensors = read_hf_dir(path, keep=r"(?!(model\.)?vision_model\.)")
    if config.get("model_type") != "blip-2":
        raise InputError(
            config_path,
            f"unsupported architecture model_type={config.get('model_type')!r} (expected 'blip-2')",
        )
    text = config.get("text_config") or {}
    if text.get("model_type", "t5") != "t5" or config.get("use_decoder_only_language_model"):
        raise InputError(
            config_path,
            f"unsupported BLIP-2 language model {text.get('model_type')!r} (only T5 / FlanT5)",
        )
    loc_offset = tokenizer_loc_offset(path, loc_bins) if loc_bins else None
    vocab = int(text.get("vocab_size", 32128))
    if loc_offset is not None and loc_offset > vocab:
        raise InputError(
            path, f"tokenizer has {loc_offset} tokens, more than the T5 vocabulary ({vocab})"
        )
    t5_module, llm_params = t5_params(
        text,
        tensors,
        source=path,
        prefix=LM_PREFIX,
        loc_bins=loc_bins,
        loc_offset=loc_offset,
        dtype=dtype,
    )
    qformer_config = qformer.QFormerConfig.from_hf(config, dtype=dtype)
    model_config = llm3d.LLM3DConfig(
        qformer=qformer_config,
        llm=t5_module.config,
        feature_dim=qformer_config.encoder_hidden_size,
    )
    module = llm3d.LLM3D(model_config)
    target = llm3d.abstract_params(module)
    rest = {k: v for k, v in tensors.items() if not k.startswith(LM_PREFIX)}
    target_rest = {k: v for k, v in target.items() if k != "llm"}
    params = apply_rules(
        rest, PROJECTION_RULES + blip2_qformer_rules(dst="qformer/"), target_rest, source=path
    )
    params["llm"] = llm_params
    return module, params
